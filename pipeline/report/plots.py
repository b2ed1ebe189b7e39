"""Plots written by the stages: confusion matrices, bar charts, line charts, training curves (matplotlib Agg, PNG files written atomically)."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.core.errors import printable  # a class named by bytes that are not UTF-8 stopped matplotlib's font: drawn as escapes


def _figure(width: float, height: float):
    # A bare Figure with an Agg canvas: no pyplot global state, no display backend,
    # safe in worker threads and next to any backend a caller has selected.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path | str) -> Path:
    """Save ``fig`` as PNG through a temporary name and an atomic rename."""
    from pipeline.core.outputs import atomic_output

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: Path | str, title: str = "") -> Path:
    """Draw a confusion matrix with annotated counts and class names on both axes.

    Args:
        cm: square count matrix, rows = true class, columns = predicted class.
        class_names: one name per row/column.
        path: the PNG file to write (atomically).
        title: figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: ``cm`` is not square or does not match ``class_names``.
    """
    cm = np.asarray(cm)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {cm.shape} but there are {k} class names")
    side = max(4.0, 0.55 * k + 2.5)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    # Colour by the row share, so a small class's errors are as visible as a big one's.
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(k), labels=[printable(n) for n in class_names], rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=[printable(n) for n in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fontsize = 10 if k <= 10 else max(5, 10 - (k - 10) // 3)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=fontsize,
                    color="white" if share[i, j] > 0.5 else "black")
    if title:
        ax.set_title(printable(title))
    return _save(fig, path)


def bar_chart(
    values: Mapping[str, float],
    path: Path | str,
    *,
    title: str = "",
    ylabel: str = "",
    errors: Mapping[str, float] | None = None,
    ylim: tuple[float, float] | None = None,
    fmt: str = "{:.3f}",
) -> Path:
    """One bar per entry of ``values`` (in the given order), each annotated with its value.

    Args:
        values: label -> bar height.
        path: the PNG file to write (atomically).
        title, ylabel: texts of the figure.
        errors: optional label -> error-bar half-width (e.g. a standard deviation).
        ylim: optional y-axis range, e.g. ``(0, 1)`` for accuracies.
        fmt: format of the annotation above each bar.

    Returns:
        ``path``.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("bar_chart needs at least one value")
    labels = list(values)
    heights = [float(values[k]) for k in labels]
    err = [float(errors.get(k, 0.0)) for k in labels] if errors else None
    fig = _figure(max(4.0, 0.8 * len(labels) + 2.0), 4.0)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(labels)), heights, yerr=err, capsize=4 if err else 0, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels=labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    for bar, h in zip(bars, heights):
        ax.annotate(fmt.format(h), (bar.get_x() + bar.get_width() / 2, h), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(printable(title))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def training_curves(history: Mapping[str, Sequence[float]], path: Path | str, *, title: str = "") -> Path:
    """Plot per-epoch curves: one panel for losses, one for every other metric.

    ``history`` is shaped like ``keras.callbacks.History.history``: ``{"loss": [...],
    "val_loss": [...], "accuracy": [...], "val_accuracy": [...]}``; a ``val_`` series is
    drawn dashed in the colour of its training series.

    Args:
        history: metric name -> one value per epoch.
        path: the PNG file to write (atomically).
        title: figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: ``history`` holds no series with values.
    """
    series = {k: [float(v) for v in vals] for k, vals in history.items() if len(vals)}
    if not series:
        raise ValueError("training_curves needs at least one non-empty series")
    bases = list(dict.fromkeys(k[4:] if k.startswith("val_") else k for k in series))
    losses = [b for b in bases if "loss" in b]
    others = [b for b in bases if "loss" not in b]
    panels = [p for p in (losses, others) if p]
    fig = _figure(5.0 * len(panels), 3.8)
    colours = [f"C{i}" for i in range(10)]
    for n, names in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), n + 1)
        for i, base in enumerate(names):
            colour = colours[i % len(colours)]
            for key, style in ((base, "-"), (f"val_{base}", "--")):
                if key in series:
                    ys = series[key]
                    ax.plot(range(1, len(ys) + 1), ys, style, color=colour, marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if names is losses else "metric")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(printable(title))
    return _save(fig, path)


def line_chart(series: Mapping[str, Mapping[float, float]], path: Path | str, *, title: str = "", xlabel: str = "", ylabel: str = "",
               bands: Mapping[str, Mapping[float, tuple[float, float]]] | None = None, log: bool = False) -> Path:
    """One line with markers per series, x values sorted (e.g. accuracy against training images per class).

    Args:
        series: label -> {x: y}.
        path: the PNG file to write (atomically).
        title, xlabel, ylabel: texts of the figure.
        bands: optional label -> {x: (low, high)}, drawn as a shaded band and error bars in the line's colour (e.g. 95% intervals).
        log: both axes logarithmic (values spanning decades: times against rows), so that close x values keep apart.

    Returns:
        ``path``.

    Raises:
        ValueError: ``series`` is empty.
    """
    if not series:
        raise ValueError("line_chart needs at least one series")
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    xs_all = sorted({x for points in series.values() for x in points})
    for label, points in series.items():
        xs = sorted(points)
        ys = [float(points[x]) for x in xs]
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        band = (bands or {}).get(label)
        if band and all(x in band for x in xs):
            lo, hi = [band[x][0] for x in xs], [band[x][1] for x in xs]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            ax.errorbar(xs, ys, yerr=[np.subtract(ys, lo), np.subtract(hi, ys)], fmt="none", ecolor=line.get_color(), capsize=3)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs_all, labels=[f"{x:,g}" for x in xs_all])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(printable(title))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


#: Colours of the interval chart by a row's status against the best row.
STATUS_COLOURS = {"best": "tab:green", "tied": "tab:blue", "different": "tab:gray"}


def interval_figure(rows: Mapping[str, tuple[float, float, float, str]], *, title: str = "", xlabel: str = ""):
    """The figure of ``interval_chart`` (for tests that measure it): one horizontal interval per row, top to bottom in the given order."""
    if not rows:
        raise ValueError("interval_chart needs at least one row")
    labels = list(rows)
    values = np.array([[float(v) for v in rows[k][:3]] for k in labels])
    lines = max(k.count("\n") + 1 for k in labels)
    # one band of height per row, tall enough for its label's lines: labels cannot overlap
    fig = _figure(10.0, 1.0 + len(labels) * max(0.45, 0.2 * lines + 0.15))
    ax = fig.add_subplot()
    y = np.arange(len(labels))[::-1]
    for i, k in enumerate(labels):
        acc, lo, hi = values[i]
        colour = STATUS_COLOURS.get(rows[k][3], "tab:gray")
        ax.errorbar([acc], [y[i]], xerr=[[max(acc - lo, 0.0)], [max(hi - acc, 0.0)]], fmt="o", color=colour, capsize=4)
        ax.annotate(f"{acc:.3f}", (hi, y[i]), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    best = [i for i, k in enumerate(labels) if rows[k][3] == "best"]
    if best:
        ax.axvspan(values[best[0], 1], values[best[0], 2], color=STATUS_COLOURS["best"], alpha=0.1, label="best row's interval")
    # the axis spans the intervals (plus room for the annotations), not 0-1: the differences are what matters
    lo, hi = values[:, 1].min(), values[:, 2].max()
    pad = max(0.1 * (hi - lo), 0.005)
    ax.set_xlim(max(0.0, lo - pad), hi + 3 * pad)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_yticks(y, labels=labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    handles = [ax.errorbar([], [], xerr=[[], []], fmt="o", color=c, label=s) for s, c in STATUS_COLOURS.items()]
    # below the axis, so it never hides a row
    ax.legend(handles=handles, labels=["best", "tied with the best", "different from the best"], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.08 - 0.5 / len(labels)), ncol=3, frameon=False)
    if title:
        ax.set_title(printable(title), fontsize=9, wrap=True)
    return fig


def interval_chart(rows: Mapping[str, tuple[float, float, float, str]], path: Path | str, *, title: str = "", xlabel: str = "") -> Path:
    """One horizontal interval per row (accuracy, low, high), coloured by its status against the best (best, tied, different).

    Args:
        rows: label -> (value, low, high, status), top to bottom.
        path: the PNG file to write (atomically).
        title, xlabel: texts of the figure.

    Returns:
        ``path``.

    Raises:
        ValueError: ``rows`` is empty.
    """
    return _save(interval_figure(rows, title=title, xlabel=xlabel), path)
