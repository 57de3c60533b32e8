"""A packaged, label-free harm classifier on the sentence-encoder view (not in the paper).

The paper's score has no notion of what "harmful" means: it ranks samples by how far they sit along the pool's
main directions, which on real pools are style and topic (measured AUROC 0.49-0.59 with the embedded model).
The guard brings that notion from outside the user's data: a logistic regression on all-MiniLM-L6-v2
embeddings of (response, exchange) (`saft.encoders`), trained by scripts/train_guard.py on public pairs:
BeaverTails safe/unsafe pairs from the judge half of the prompt split, plus refusals by a safety-tuned model
to harmful prompts (labelled safe, so that refusals, which a model needs to stay safe, are kept).
Its weights ship as `guard_minilm_v1.json` with the true- and false-positive rates measured by grouped
cross-validation, which `contamination_estimate` uses for an adjusted classify-and-count estimate
(Forman, 2008) of the harmful share of a pool: (flagged share - fpr) / (tpr - fpr), clipped to [0, 1].
That correction assumes the pool's harmful and safe rows look to the guard like its training rows; on
BeaverTails-like pools it does not hold well (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_array, check_is_fitted

GUARD_FILE = Path(__file__).resolve().parent.parent / "guard_minilm_v1.json"


class GuardScorer(BaseEstimator):
    """Score = the packaged guard's log-odds of harmful, on the sentence-encoder view (768 columns).

    Parameters
    ----------
    weights : str or None, default=None
        JSON file with `coef`, `intercept` and `meta` (`cv_tpr`, `cv_fpr`) as written by scripts/train_guard.py;
        None = the packaged `guard_minilm_v1.json`.

    `fit(X, y=None)` only loads the weights and checks X's width: the guard needs no labels from the pool, and
    ignores them when given.
    """

    view = "sentence"

    def __init__(self, weights: str | None = None):
        self.weights = weights

    def fit(self, X, y=None):
        X = check_array(X, dtype=np.float64)
        path = Path(self.weights) if self.weights else GUARD_FILE
        data = json.loads(path.read_text())
        self.coef_ = np.asarray(data["coef"], dtype=np.float64)
        self.intercept_ = float(data["intercept"])
        self.meta_ = data.get("meta", {})
        self.tpr_, self.fpr_ = float(self.meta_.get("cv_tpr", 1.0)), float(self.meta_.get("cv_fpr", 0.0))
        if X.shape[1] != len(self.coef_):
            raise ValueError(f"the guard reads the sentence-encoder view ({len(self.coef_)} columns) but got "
                             f"{X.shape[1]} columns; compute X with saft.encoders.sentence_features")
        self.n_features_in_ = X.shape[1]
        return self

    def score_samples(self, X) -> np.ndarray:
        """Log-odds of harmful: higher = more suspicious; > 0 means the guard flags the sample."""
        check_is_fitted(self, "coef_")
        X = check_array(X, dtype=np.float64)
        return X @ self.coef_ + self.intercept_

    def contamination_estimate(self, X) -> float:
        """Label-free estimate of the harmful share of X (adjusted classify-and-count)."""
        flagged = float((self.score_samples(X) > 0).mean())
        if self.tpr_ - self.fpr_ <= 0:
            return flagged
        return float(np.clip((flagged - self.fpr_) / (self.tpr_ - self.fpr_), 0.0, 1.0))
