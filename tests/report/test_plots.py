"""Plot helpers shared by train, finetune and compare: PNG files, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.report import plots

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


def test_line_chart_draws_interval_bands(tmp_path):
    series = {"LR": {100: 0.85, 300: 0.9}}
    bands = {"LR": {100: (0.83, 0.87), 300: (0.88, 0.92)}}
    p = plots.line_chart(series, tmp_path / "sizes.png", title="accuracy", bands=bands)
    assert p.read_bytes().startswith(PNG)


def test_interval_chart_zooms_on_the_differences_and_its_labels_do_not_overlap(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = {f"strategy {i} with a long name\n{1000} train + {200 * (i % 2)} val, {i * 10} s": (0.86 + 0.004 * i, 0.845 + 0.004 * i, 0.875 + 0.004 * i,
            "best" if i == 9 else ("tied" if i > 6 else "different")) for i in range(10)}  # fmt: skip
    fig = plots.interval_figure(rows, title="t", xlabel="accuracy")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert 0.8 < lo < 0.845 and 0.911 < hi < 0.95  # the axis spans the intervals, not 0-1
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    boxes = sorted((t.get_window_extent(canvas.get_renderer()) for t in ax.get_yticklabels()), key=lambda b: b.y0)
    assert len(boxes) == 10
    assert all(a.y1 <= b.y0 for a, b in zip(boxes, boxes[1:])), "tick labels overlap"
    top = max(ax.get_yticklabels(), key=lambda t: t.get_position()[1])
    assert top.get_text() == list(rows)[0]  # the first row is drawn on top
    assert plots.interval_chart(rows, tmp_path / "c.png").read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="at least one row"):
        plots.interval_chart({}, tmp_path / "none.png")


def test_interval_chart_draws_a_row_outside_its_interval_by_rounding(tmp_path):
    """A perfect row (accuracy 1.0) whose upper bound was rounded below it crashed the chart; the chart draws it (a zero-length arm)."""
    out = tmp_path / "c.png"
    plots.interval_chart({"lr": (1.0, 0.75, 0.9999999999999999, "best"), "svm": (0.5, 0.3, 0.7, "different")}, out, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
