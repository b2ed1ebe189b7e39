"""The ground floor every family stands on: errors, settings and their validation, the split, outputs, metrics, plots."""
