"""The feature file: its schema, chunk layout, writer and validating reader."""
