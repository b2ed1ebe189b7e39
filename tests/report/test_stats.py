"""The statistics of a test accuracy against hand-computed cases: Wilson intervals, the exact McNemar test (no and all discordant pairs), the majority vote, the best row and its ties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.report import stats
from pipeline.core.errors import PipelineError

Z = 1.959963984540054  # the 97.5% point of the standard normal


def wilson_by_hand(k, n):
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / (1 + Z**2 / n)
    return centre - half, centre + half


def test_wilson_matches_the_formula_and_known_values():
    # 450 of 500 correct (0.90), by hand: centre 0.903841 / 1.007683 = 0.89695, half 0.026575 / 1.007683 = 0.02637
    low, high = stats.wilson(450, 500)
    assert (round(low, 4), round(high, 4)) == (0.8706, 0.9233)
    for k, n in ((1800, 2000), (7, 10), (1, 3)):
        assert stats.wilson(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)
    # 0 and n successes: the interval touches 0 (or 1) and stays inside [0, 1]
    assert stats.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and stats.wilson(0, 10)[1] == pytest.approx(Z**2 / (10 + Z**2), abs=1e-12)
    assert stats.wilson(10, 10)[1] == pytest.approx(1.0, abs=1e-12) and stats.wilson(10, 10)[0] == pytest.approx(10 / (10 + Z**2), abs=1e-12)
    # 2,000 images around 0.90: +-1.3 points, half of 500 images' +-2.6
    low, high = stats.wilson(1800, 2000)
    assert 0.012 < (high - low) / 2 < 0.014
    with pytest.raises(PipelineError, match=r"^wilson: 3 correct of 2: needs n >= 1"):
        stats.wilson(3, 2)


def test_mcnemar_counts_discordant_pairs_and_gives_the_exact_p_value():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    # no discordant image: p = 1
    assert stats.mcnemar(y, y, y) == (0, 0, 1.0)
    wrong = (y + 1) % 3
    assert stats.mcnemar(y, wrong, wrong) == (0, 0, 1.0)
    # every image discordant, all one way (10 vs 0): p = 2 * 0.5**10
    assert stats.mcnemar(y, y, wrong) == (10, 0, pytest.approx(2 / 1024, abs=1e-15))
    assert stats.mcnemar(y, wrong, y) == (0, 10, pytest.approx(2 / 1024, abs=1e-15))
    # 1 vs 9: p = 2 * (C(10,0) + C(10,1)) / 2**10 = 22/1024
    a = y.copy()
    a[0] = wrong[0]
    b = wrong.copy()
    b[0] = y[0]
    assert stats.mcnemar(y, a, b) == (9, 1, pytest.approx(22 / 1024, abs=1e-15))
    # 5 vs 0, the rest concordant: p = 2 / 32 = 0.0625 (not significant)
    a = y.copy()
    b = y.copy()
    b[:5] = wrong[:5]
    assert stats.mcnemar(y, a, b) == (5, 0, pytest.approx(0.0625, abs=1e-15))
    # balanced discordance (3 vs 3): p = 1
    a, b = y.copy(), y.copy()
    a[:3], b[3:6] = wrong[:3], wrong[3:6]
    assert stats.mcnemar(y, a, b) == (3, 3, pytest.approx(1.0))
    with pytest.raises(PipelineError, match="pair the same test images"):
        stats.mcnemar(y, y[:5], y)


def test_majority_vote():
    runs = np.array([[0, 1, 2, 2], [0, 2, 1, 1], [1, 2, 0, 2]])
    # image 0: 0,0,1 -> 0; image 1: 1,2,2 -> 2; image 2: 2,1,0 three-way tie -> the first run's 2; image 3: 2,1,2 -> 2
    assert stats.majority_vote(runs).tolist() == [0, 2, 2, 2]
    assert stats.majority_vote(runs[:1]).tolist() == runs[0].tolist()
    # two runs disagreeing: the first run's label
    assert stats.majority_vote(np.array([[3, 0], [1, 2]])).tolist() == [3, 0]


def test_judge_names_the_best_and_the_rows_tied_with_it():
    y = np.zeros(20, int)
    best = y.copy()  # 20/20
    close = y.copy()
    close[:2] = 1  # 18/20: 2 discordant, p = 0.5 -> tied
    far = y.copy()
    far[:10] = 1  # 10/20: 10 discordant all one way, p = 2/1024 -> different
    name, verdicts = stats.judge(y, {"close": close, "best": best, "far": far})
    assert name == "best"
    assert [verdicts[k].status for k in ("close", "best", "far")] == ["tied", "best", "different"]
    assert verdicts["close"].p_value == pytest.approx(0.5) and verdicts["far"].p_value == pytest.approx(2 / 1024)
    assert verdicts["best"].p_value == 1.0 and (verdicts["far"].b, verdicts["far"].c) == (0, 10)
    assert (verdicts["far"].low, verdicts["far"].high) == pytest.approx(wilson_by_hand(10, 20))
    assert stats.summary(name, verdicts) == "best: best; tied: close"
    # a ranking accuracy given (a mean over seeds) picks the best and centres the interval
    name, verdicts = stats.judge(y, {"close": close, "best": best}, accuracies={"close": 0.95, "best": 0.9})
    assert name == "close" and verdicts["close"].accuracy == 0.95
    assert (verdicts["close"].low, verdicts["close"].high) == pytest.approx(wilson_by_hand(19, 20))
    # equal accuracies: the first row in table order is the best
    name, verdicts = stats.judge(y, {"a": close, "b": close.copy()})
    assert name == "a" and stats.summary(name, verdicts) == "best: a; tied: b"
    _, verdicts = stats.judge(y, {"best": best, "far": far})
    assert stats.summary("best", verdicts) == "best: best; tied: none"
    with pytest.raises(PipelineError, match=r"row 'short': predictions for 3 images but 20 test labels"):
        stats.judge(y, {"best": best, "short": best[:3]})


def test_macro_f1_averages_the_classes_with_an_image_or_a_prediction():
    """A class with no test image and no prediction has no F1: counting it as 0 made a perfect model on 2 of 3 classes score 0.667."""
    from sklearn.metrics import f1_score

    from pipeline.report.metrics import scores

    perfect = scores([0, 0, 1, 1], [0, 0, 1, 1], ["a", "b", "c"])
    assert perfect["macro_f1"] == 1.0 and perfect["per_class"]["c"]["support"] == 0 and len(perfect["confusion"]) == 3
    wrong = scores([0, 0, 1, 1], [0, 2, 1, 1], ["a", "b", "c"])  # c predicted though absent: it counts, as F1 0
    assert wrong["macro_f1"] == f1_score([0, 0, 1, 1], [0, 2, 1, 1], average="macro", zero_division=0) == (2 / 3 + 1 + 0) / 3



@pytest.mark.parametrize("y_true, y_pred", [([0, 0, 1, 1], [0, 0, 1, 1]), ([0, 0, 1, 1], [0, 2, 1, 1]), ([1, 2, 2], [1, 2, 1]), ([2], [0])])
def test_the_text_report_averages_what_the_macro_f1_averages(y_true, y_pred):
    """Fifteenth pass: evaluate's report.txt listed an absent class at 0.000 and averaged it (macro avg 0.167) beside metrics.json's
    macro-F1 0.250 of the same run. Its macro avg is now the macro-F1; a class with no image and no prediction is named below."""
    import re

    from pipeline.report.metrics import classification_report, scores

    names = ["a", "b", "c"]
    text = classification_report(y_true, y_pred, names)
    macro = float(re.search(r"macro avg\s+\S+\s+\S+\s+(\S+)", text).group(1))
    assert macro == round(scores(y_true, y_pred, names)["macro_f1"], 3)
    absent = [n for i, n in enumerate(names) if i not in set(y_true) | set(y_pred)]
    assert ("not in the test data and never predicted (not scored, not averaged): " + ", ".join(absent) in text) == bool(absent)
    assert all(re.search(rf"^\s+{n}\s+\d", text, re.M) is None for n in absent)


def test_wilson_holds_the_observed_share_at_every_size():
    """Fourth pass (#22): at 13 of 13 (and 932 other sizes up to 3,000) rounding put the upper bound a hair below 1.0, so a perfect row's
    interval excluded its own accuracy and compare's chart died with "'xerr' must not contain negative values"."""
    for n in range(1, 3000):
        for correct in (0, 1, n // 2, n - 1, n):
            lo, hi = stats.wilson(correct, n)
            assert 0.0 <= lo <= correct / n <= hi <= 1.0, (correct, n, lo, hi)
