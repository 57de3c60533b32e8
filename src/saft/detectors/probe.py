"""A semi-supervised probe: the pool's principal subspace as a prior, a few labels for the direction.

Features are (optionally) standardised and projected on the top `n_components` principal directions of the
whole (unlabelled) pool; a class-balanced logistic regression is then fitted on the labelled rows only. With ~100
labels in 576+ dimensions a probe on raw features overfits; restricting it to the pool's main directions is
the "subspace as a prior" that makes a handful of labels usable. Not in the paper. numpy/scikit-learn only.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_array, check_is_fitted


def semi_supervised_labels(y, who: str) -> tuple[np.ndarray, np.ndarray]:
    """(y, labelled mask) for a detector trained on the labelled rows of y (1, 0, or -1 for unlabelled)."""
    if y is None:
        raise ValueError(f"{who} needs labels: fit(X, y) with y in {{1, 0, -1 for unlabelled}}")
    y = np.asarray(y)
    labelled = y >= 0
    if len(set(y[labelled].tolist())) < 2:
        raise ValueError(f"{who} needs at least one harmful (1) and one safe (0) labelled row")
    return y, labelled


class ProbeScorer(BaseEstimator):
    """Logistic probe on the pool's top principal components, trained on the labelled rows.

    Parameters
    ----------
    n_components : int, default=32
        Principal components of the pool kept as the probe's input.
    C : float, default=0.1
        Inverse L2 strength of the logistic regression.
    standardize : bool, default=True
        Scale features to unit variance before the PCA.

    `fit(X, y)`: `y` holds 1 (harmful), 0 (safe) or -1 (unlabelled, the scikit-learn semi-supervised
    convention); every row of X shapes the subspace, only labelled rows train the probe.
    """

    def __init__(self, n_components: int = 32, C: float = 0.1, standardize: bool = True):
        self.n_components = n_components
        self.C = C
        self.standardize = standardize

    def fit(self, X, y=None):
        X = check_array(X, dtype=np.float64)
        y, labelled = semi_supervised_labels(y, "ProbeScorer")
        k = min(self.n_components, X.shape[0] - 1, X.shape[1])
        self.scaler_ = StandardScaler(with_std=self.standardize).fit(X)
        self.pca_ = PCA(n_components=k, random_state=0).fit(self.scaler_.transform(X))
        Z = self.pca_.transform(self.scaler_.transform(X[labelled]))
        self.probe_ = LogisticRegression(C=self.C, class_weight="balanced", max_iter=5000).fit(Z, y[labelled])
        self.n_features_in_ = X.shape[1]
        return self

    def score_samples(self, X) -> np.ndarray:
        """Log-odds of harmful: higher = more suspicious."""
        check_is_fitted(self, "probe_")
        X = check_array(X, dtype=np.float64)
        return self.probe_.decision_function(self.pca_.transform(self.scaler_.transform(X)))
