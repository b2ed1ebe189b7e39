"""Extraction: class-per-folder images -> the backbone -> crash-safe HDF5 feature files, sharded, merged and distributed on Ray."""
