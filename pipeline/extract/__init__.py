"""The extract job: images to a feature file, resumable, incremental, sharded."""
