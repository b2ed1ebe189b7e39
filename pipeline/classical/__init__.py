"""Classical models on extracted features: scikit-learn searches and fits, the model bundle, the overlap rule between training and test files, and the train stage."""
