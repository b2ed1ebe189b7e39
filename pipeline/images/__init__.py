"""Image input: listing a class-per-folder tree, decoding and resizing."""
