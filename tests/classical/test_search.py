"""The cross-validated search: warm-start paths, one score per fold and candidate, ties to the stronger regularisation."""

from __future__ import annotations

import numpy as np

from pipeline.classical.models import MODELS
from pipeline.classical.search import candidates, search


def test_candidates_are_warm_start_paths():
    assert candidates(MODELS["lr"], {"C": [1.0, 0.1]}) == [[{"C": 0.1}, {"C": 1.0}]]
    assert candidates(MODELS["svm"], {"C": [1.0, 0.1]}) == [[{"C": 1.0}], [{"C": 0.1}]]
    paths = candidates(MODELS["rf"], {"n_estimators": [20, 10], "max_features": ["sqrt", "log2"]})
    assert paths == [
        [{"max_features": "sqrt", "n_estimators": 10}, {"max_features": "sqrt", "n_estimators": 20}],
        [{"max_features": "log2", "n_estimators": 10}, {"max_features": "log2", "n_estimators": 20}],
    ]


def test_search_scores_every_candidate_on_every_fold_and_breaks_ties_to_the_smaller_c():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(60, 5)) + np.repeat(np.eye(3, 5) * 6, 20, axis=0)).astype(np.float32)
    y = np.repeat([0, 1, 2], 20)
    result = search(MODELS["lr"], x, y, {"C": [10.0, 1.0]}, cv=4, seed=0, n_jobs=2, quiet=True)
    assert result.kind == "cv" and [r["params"] for r in result.results] == [{"C": 1.0}, {"C": 10.0}]
    assert all(len(r["scores"]) == 4 for r in result.results)
    assert result.results[0]["mean"] == result.results[1]["mean"] == 1.0  # separable: a tie
    assert result.best_params == {"C": 1.0} and result.best_score == 1.0 and result.best_std == 0.0
    again = search(MODELS["lr"], x, y, {"C": [10.0, 1.0]}, cv=4, seed=0, n_jobs=1, quiet=True)
    assert again.results == result.results  # threads do not change the scores
