"""The paper's subspace score (SAFT): energy of a centred embedding in the pool's top singular directions.

    s_i = (1/k) * sum_{j<=k} w_j * <f_i - mean, v_j>^2

with v_j the top-k right singular vectors of the centred pool matrix and w_j = 1 (the paper's reading) or
w_j = sigma_j (HaloScope's weighted variant, `weighted=True`). Squaring makes the score independent of the
arbitrary sign of each singular vector. Higher = more suspicious. numpy only.

`standardize=True` (not in the paper) divides each feature by its pool standard deviation first: LLM residual
streams carry a few dimensions with huge activations that otherwise dominate the top singular vectors.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_array, check_is_fitted


class SubspaceScorer(BaseEstimator):
    """Mean squared projection of centred features on the top `n_components` singular vectors.

    Parameters
    ----------
    n_components : int, default=1
        k, the number of singular vectors (the paper searches 1..4).
    weighted : bool, default=False
        Weight each squared projection by its singular value.
    standardize : bool, default=False
        Scale every feature to unit variance over the pool before the SVD.

    Attributes
    ----------
    mean_ : (d,) pool mean.
    scale_ : (d,) pool standard deviation used for scaling (ones without `standardize`).
    components_ : (k, d) top right singular vectors.
    singular_values_ : (k,) their singular values.
    """

    def __init__(self, n_components: int = 1, weighted: bool = False, standardize: bool = False):
        self.n_components = n_components
        self.weighted = weighted
        self.standardize = standardize

    def fit(self, X, y=None):
        X = check_array(X, dtype=np.float64)
        if not isinstance(self.n_components, (int, np.integer)) or not 1 <= self.n_components <= min(X.shape):
            raise ValueError(f"n_components must be an integer in 1..{min(X.shape)} for X of shape {X.shape}, "
                             f"got {self.n_components!r}")
        self.mean_ = X.mean(axis=0)
        # A constant feature would divide by zero; it carries no information, so leave it unscaled.
        self.scale_ = np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0) if self.standardize else np.ones(X.shape[1])
        # full_matrices=False: only the top directions are needed; d can be thousands.
        _, s, vt = np.linalg.svd((X - self.mean_) / self.scale_, full_matrices=False)
        self.components_ = vt[: self.n_components]
        self.singular_values_ = s[: self.n_components]
        self.n_features_in_ = X.shape[1]
        return self

    def score_samples(self, X) -> np.ndarray:
        """harm_score per row: higher = more suspicious."""
        check_is_fitted(self, "components_")
        X = check_array(X, dtype=np.float64)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but the scorer was fitted on {self.n_features_in_}")
        proj = ((X - self.mean_) / self.scale_) @ self.components_.T  # (n, k)
        weights = self.singular_values_ if self.weighted else np.ones(self.n_components)
        return (proj**2 * weights).mean(axis=1)

    def decision_function(self, X) -> np.ndarray:
        return self.score_samples(X)
