"""Compare's verdicts: each row's predictions paired with the others' by test image, its Wilson interval, its exact McNemar test against the best row, and the summary line naming the best and the rows tied with it."""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.report.stats import Verdict, judge, summary


def paired(rows: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The test labels and each row's predictions, aligned by test image path (the first row's order).

    Raises:
        PipelineError: a row was scored on other test images, or gives another label to one.
    """
    ref = rows[0]["predictions"]
    order = {p: i for i, p in enumerate(ref["paths"])}
    y_true = np.asarray(ref["y_true"])
    out = {}
    for r in rows:
        p = r["predictions"]
        if len(p["paths"]) != len(order) or set(p["paths"]) != set(order):
            other = sorted(set(p["paths"]) ^ set(order))
            raise PipelineError(f"row {r['strategy']!r} was scored on other test images than {rows[0]['strategy']!r} (e.g. {other[0] if other else 'a repeated path'}); re-run with --rerun")
        idx = np.asarray([order[x] for x in p["paths"]])
        y_pred = np.empty(len(order), np.int64)
        y_pred[idx] = p["y_pred"]
        truth = np.empty(len(order), np.int64)
        truth[idx] = p["y_true"]
        if not np.array_equal(truth, y_true):
            raise PipelineError(f"row {r['strategy']!r} labels the test images differently from {rows[0]['strategy']!r}; re-run with --rerun")
        out[r["strategy"]] = y_pred
    return y_true, out


def judged(rows: list[dict]) -> list[dict]:
    """The rows with their 95% Wilson interval, the exact McNemar p-value against the best row, and ``status`` (best, tied or different)."""
    y_true, predictions = paired(rows)
    best, verdicts = judge(y_true, predictions, {r["strategy"]: float(r["accuracy"]) for r in rows})
    for r in rows:
        v = verdicts[r["strategy"]]
        r.update(ci_low=v.low, ci_high=v.high, p_value=v.p_value, status=v.status, discordant=[v.b, v.c])
    return rows


def summary_line(rows: list[dict]) -> str:
    """``best: X; tied: Y, Z`` of judged rows."""
    verdicts = {r["strategy"]: Verdict(r["accuracy"], r["ci_low"], r["ci_high"], *r["discordant"], r["p_value"], r["status"]) for r in rows}
    return summary(next(r["strategy"] for r in rows if r["status"] == "best"), verdicts)




def summaries(rows: list[dict], sizes: tuple[int, ...]) -> list[str]:
    """Per size of ``compare --sizes``: ``N/class: best: X; tied: Y, Z``."""
    return [f"{n}/class: " + summary_line([r for r in rows if r["per_class"] == n]) for n in sizes if any(r["per_class"] == n for r in rows)]
