"""The ground floor every family stands on: errors, settings and their validation, the split, outputs and output sets, signals (``report/`` holds the scores, statistics and charts)."""
