"""Offline transfer learning for image classification: bottleneck features of an ImageNet backbone, classical classifiers, fine-tuning, comparison.

The Python API (``pipeline.api``): ``extract_features`` and ``load_model``, importable from here.
"""

from pipeline.core.quiet import quiet_tensorflow

# TensorFlow's start-up chatter (log-level notices, oneDNN and CUDA probes) drowns the progress bar.
quiet_tensorflow()

__version__ = "0.1.0"
__all__ = ["extract_features", "load_model", "__version__"]


def __getattr__(name):
    # Lazily: `import pipeline` (every command) must not load numpy, Pillow or TensorFlow.
    if name in ("extract_features", "load_model"):
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
