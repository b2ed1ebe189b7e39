"""The bench command: extraction and data-path measurements."""
