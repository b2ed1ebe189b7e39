"""Feature files for the classical tests: a few well separated classes written by the real feature-file writer, and small search grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.featurefile.writer import write_feature_file

PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = ("ant", "bee", "cat")
#: Small grids so that every fit takes milliseconds.
FAST_GRID = {"lr": {"C": [0.01, 1.0]}, "svm": {"C": [1e-3, 1e-1]}, "rf": {"n_estimators": [10, 20], "max_features": ["sqrt"]}}


def make_features(
    path: Path,
    *,
    per_class: int | list[int] = 20,
    classes=CLASSES,
    row_shape=(1, 1, 512),
    seed: int = 0,
    noise: float = 1.0,
    rejected=(),
    **attrs,
) -> Path:
    """A complete feature file: ``per_class`` rows per class around well separated class means."""
    rng = np.random.default_rng(seed)
    counts = per_class if isinstance(per_class, list) else [per_class] * len(classes)
    means = np.random.default_rng(1234).normal(size=(len(classes), *row_shape)) * 3.0
    labels = np.concatenate([np.full(n, c, np.int32) for c, n in enumerate(counts)])
    feats = (means[labels] + noise * rng.normal(size=(len(labels), *row_shape))).astype(np.float32)
    paths = [f"{classes[c]}/{i:03d}.png" for i, c in enumerate(labels)]
    side = row_shape[0] * 32
    spec = {
        "backbone": "vgg16",
        "layer": "block5_pool",
        "input_size": side,
        "feature_shape": list(row_shape),
        "preprocessing": "caffe",
        "resize": "bilinear",
        "weights": "none",
        "weights_checksum": "none",
        "precision": "float32",
        "storage_dtype": "float16",
    }
    spec.update(attrs)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    write_feature_file(
        path,
        row_shape=tuple(row_shape),
        storage="float16",
        class_names=tuple(classes),
        rows=iter([(feats, labels, paths, np.zeros(n, np.int64), np.zeros(n, np.int64))]),
        rejected=[(path_, reason, 10, 1) for path_, reason in rejected],  # (path, reason) of files not extracted
        attrs=spec,
    )
    return path
