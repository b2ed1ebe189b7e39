"""Plot helpers shared by train, finetune and compare: PNG files, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core import plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_bar_chart_and_training_curves(tmp_path):
    p = plots.bar_chart({"lr": 0.91, "svm": 0.9, "rf": 0.85}, tmp_path / "bars.png", title="accuracy", ylim=(0, 1), errors={"lr": 0.01})
    assert p.read_bytes().startswith(PNG)
    history = {"loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.8, 0.7], "accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.5, 0.6, 0.7]}
    assert plots.training_curves(history, tmp_path / "curves.png", title="finetune").read_bytes().startswith(PNG)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bars.png", "curves.png"]
    with pytest.raises(ValueError, match="at least one"):
        plots.bar_chart({}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="shape"):
        plots.confusion_matrix(np.zeros((2, 3)), ["a", "b"], tmp_path / "cm.png")


def test_line_chart(tmp_path):
    from PIL import Image

    series = {"ResNet-20": {100: 0.79, 300: 0.85}, "LR": {300: 0.91, 100: 0.9}}
    p = plots.line_chart(series, tmp_path / "sizes.png", title="accuracy", xlabel="per class", ylabel="accuracy")
    assert p.read_bytes().startswith(PNG) and Image.open(p).size[0] > 100
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sizes.png"]  # written atomically: no temporary left
    with pytest.raises(ValueError, match="at least one series"):
        plots.line_chart({}, tmp_path / "none.png")
