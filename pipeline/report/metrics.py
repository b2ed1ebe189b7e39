"""Test-set scores every stage reports the same way: accuracy with its 95% interval and number of images, macro-F1, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

from typing import Sequence

#: Below this many test images an accuracy is flagged as rough (its 95% interval spans about +-10 points).
ROUGH_BELOW = 100


def scores(y_true, y_pred, class_names: Sequence[str]) -> dict:
    """Accuracy, its Wilson 95% interval and number of images, macro-F1, per-class precision/recall/F1/support and the confusion matrix (a list of lists).

    Every class of ``class_names`` is scored, also one absent from ``y_true`` (zero support).
    Macro-F1 averages the classes present in ``y_true`` or ``y_pred`` (scikit-learn's rule): a
    class with no test image and no prediction has no F1 to average (counting it as 0 made a
    perfect model on 2 of 3 classes score 0.667); one predicted but absent counts, as 0.
    """
    import numpy as np
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from pipeline.report.stats import wilson

    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    correct, n = int(np.sum(np.asarray(y_true) == np.asarray(y_pred))), len(y_true)
    return {
        "accuracy": correct / n,
        "accuracy_ci95": list(wilson(correct, n)),
        "n_scored": n,
        "macro_f1": float(np.mean(f[np.union1d(np.asarray(y_true, int), np.asarray(y_pred, int))])) if n else 0.0,
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def classification_report(y_true, y_pred, class_names: Sequence[str], digits: int = 3) -> str:
    """scikit-learn's text report over the classes ``scores`` averages (in the test labels or the predictions), then a line naming
    any other class of ``class_names``: its 0.000 row made the report's macro avg disagree with the macro-F1 of the same run."""
    import numpy as np
    from sklearn.metrics import classification_report as report

    present = np.union1d(np.asarray(y_true, int), np.asarray(y_pred, int)).tolist()
    if not present:
        return "no test images\n"
    text = report(y_true, y_pred, labels=present, target_names=[class_names[i] for i in present], digits=digits, zero_division=0)
    absent = [name for i, name in enumerate(class_names) if i not in present]
    if absent:
        text += f"\nnot in the test data and never predicted (not scored, not averaged): {', '.join(absent)}\n"
    return text


def accuracy_text(m: dict) -> str:
    """``accuracy 0.894 (95% CI 0.866-0.917, 500 images)`` of a ``scores`` dict."""
    lo, hi = m["accuracy_ci95"]
    return f"accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, {m['n_scored']} images)"


def rough_warning(n: int) -> str | None:
    """A warning line when ``n`` test images are too few for a precise accuracy, else None."""
    if n >= ROUGH_BELOW:
        return None
    return f"warning: only {n} test images: the accuracy is rough (its 95% interval is wide); test on {ROUGH_BELOW} or more"


def csv_text(header, rows) -> str:
    """A CSV table (header, then rows) as text, quoted where needed."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()
