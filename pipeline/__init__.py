"""Offline transfer learning for image classification: VGG16 bottleneck features, classical classifiers, fine-tuning, comparison."""

import os

# TensorFlow's C++ start-up chatter (oneDNN notices, CUDA probes) drowns the progress bar.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
