"""Offline transfer learning for image classification: VGG16 bottleneck features, classical classifiers, fine-tuning, comparison."""

__version__ = "0.1.0"
