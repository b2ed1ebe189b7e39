"""What a result looks like, on the ground floor beside core: test-set scores with their intervals, the paired tests and verdicts between strategies, and the charts."""
