"""Test-set scores every stage reports the same way: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

from typing import Sequence


def scores(y_true, y_pred, class_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (a list of lists).

    Every class of ``class_names`` is scored, also one absent from ``y_true`` (zero support).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def classification_report(y_true, y_pred, class_names: Sequence[str], digits: int = 3) -> str:
    """scikit-learn's text report over every class of ``class_names``."""
    from sklearn.metrics import classification_report as report

    return report(y_true, y_pred, labels=list(range(len(class_names))), target_names=list(class_names), digits=digits, zero_division=0)
