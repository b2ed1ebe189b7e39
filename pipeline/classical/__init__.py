"""Classical models on extracted features: pooled reading, scikit-learn searches, model bundles, the train and predict stages."""
