"""Using a trained model: predict (label images), evaluate (score it on labelled data) and export (one portable network)."""
