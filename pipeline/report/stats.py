"""The uncertainty of a test accuracy: the Wilson 95% interval, the exact paired McNemar test, the per-image majority vote of repeated runs, and the best row with the rows tied with it."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from pipeline.core.errors import PipelineError

#: Two-sided confidence of the intervals, and the significance level below which a row differs from the best.
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


def wilson(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of ``correct`` successes in ``n`` trials.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or ``n``
    successes (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it).

    Raises:
        PipelineError: ``n`` < 1 or ``correct`` outside [0, n].
    """
    if n < 1 or not 0 <= correct <= n:
        raise PipelineError(f"wilson: {correct} correct of {n}: needs n >= 1 and 0 <= correct <= n")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval holds p (exactly 1 at n of n); rounding must not leave p a hair outside it
    return max(0.0, min(p, float(centre - half))), min(1.0, max(p, float(centre + half)))


def mcnemar(y_true, pred_a, pred_b) -> tuple[int, int, float]:
    """The exact paired McNemar test of two classifiers on the same images.

    Only the discordant images count: ``b`` where A is right and B wrong, ``c`` where A is
    wrong and B right. Under the null hypothesis (same accuracy) each discordant image is a
    fair coin, so the p-value is the two-sided exact binomial test of ``b`` in ``b + c``
    (``scipy.stats.binomtest``); with no discordant image it is 1.

    Returns:
        ``(b, c, p_value)``.

    Raises:
        PipelineError: the three arrays differ in length.
    """
    y, a, b_ = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if not len(y) == len(a) == len(b_):
        raise PipelineError(f"mcnemar: {len(y)} labels but predictions for {len(a)} and {len(b_)} images; pair the same test images")
    ok_a, ok_b = a == y, b_ == y
    b = int(np.sum(ok_a & ~ok_b))
    c = int(np.sum(~ok_a & ok_b))
    if b + c == 0:
        return b, c, 1.0
    from scipy.stats import binomtest

    return b, c, float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def majority_vote(predictions) -> np.ndarray:
    """The per-image majority label of repeated runs (rows: runs, columns: images).

    A tie keeps the first run's label when it is among the most frequent, else the smallest
    tied label, so the vote of one run is that run.
    """
    p = np.asarray(predictions, dtype=np.int64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise PipelineError(f"majority_vote: needs a (runs, images) array, got shape {p.shape}")
    k = int(p.max()) + 1 if p.size else 1
    counts = np.zeros((p.shape[1], k), np.int64)
    for run in p:
        np.add.at(counts, (np.arange(p.shape[1]), run), 1)
    top = counts.max(axis=1)
    first = p[0]
    return np.where(counts[np.arange(p.shape[1]), first] == top, first, counts.argmax(axis=1))


@dataclass(frozen=True)
class Verdict:
    """One row against the best: its interval, the paired test, and whether it is tied with the best."""

    accuracy: float
    low: float
    high: float
    b: int
    c: int
    p_value: float
    status: str  # "best", "tied" or "different"


def judge(y_true, predictions: dict[str, np.ndarray], accuracies: dict[str, float] | None = None) -> tuple[str, dict[str, Verdict]]:
    """Each row's Wilson interval and its McNemar test against the best row on the same images.

    Args:
        y_true: the test labels.
        predictions: row name -> its per-image labels (a repeated row: its majority vote), in table order.
        accuracies: row name -> the accuracy that ranks it (a repeated row: its mean over
            seeds); None = the accuracy of ``predictions``. The best is the highest, the first
            in table order on a tie.

    Returns:
        ``(best row, {row: Verdict})``; a row with p >= ALPHA is ``tied`` with the best.

    Raises:
        PipelineError: no rows, or predictions of another length than the labels.
    """
    y = np.asarray(y_true)
    if not predictions:
        raise PipelineError("judge: no rows to compare")
    for name, pred in predictions.items():
        if len(pred) != len(y):
            raise PipelineError(f"row {name!r}: predictions for {len(pred)} images but {len(y)} test labels; rows must be scored on the same test images")
    acc = {k: float(np.mean(np.asarray(v) == y)) for k, v in predictions.items()} if accuracies is None else dict(accuracies)
    best = max(predictions, key=lambda k: acc[k])  # max keeps the first of equals
    verdicts = {}
    for name, pred in predictions.items():
        low, high = wilson(int(round(acc[name] * len(y))), len(y))  # a mean over seeds: its mean count of correct images
        b, c, p = mcnemar(y, pred, predictions[best])
        status = "best" if name == best else ("tied" if p >= ALPHA else "different")
        verdicts[name] = Verdict(acc[name], low, high, b, c, p, status)
    return best, verdicts


def summary(best: str, verdicts: dict[str, Verdict]) -> str:
    """``best: X; tied: Y, Z`` (``tied: none`` when every other row differs significantly)."""
    tied = [k for k, v in verdicts.items() if v.status == "tied"]
    return f"best: {best}; tied: {', '.join(tied) if tied else 'none'}"
