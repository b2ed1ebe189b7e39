"""The compare command: every strategy on the same test images."""
