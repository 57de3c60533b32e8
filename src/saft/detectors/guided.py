"""labelled, the default with labels: a probe on the model's features guided by the label-free detector's two
scores (not in the paper).

A logistic probe on ~100 labels in the pool's top principal components of the model's features is excellent where
harmful rows differ in kind from the rest of the pool (task data), weak where they do not (safe and unsafe answers
to the same kind of question). The label-free detector (`ModelGuardScorer`) brings outside knowledge of harm and
is best exactly there. This detector gives the probe the label-free detector's two scores as two more inputs, its
classifier's (the guard's recipe retrained on the guard's rows in the model's view) and its student's (a probe on
the pool taught by the classifier's surest calls), so that the labels decide how much to trust each.

With ~100 labels the regression cannot average out 32 noisy directions. `guard_weight` multiplies each guide
input after standardising, which under the regression's L2 penalty is a prior: the guide's direction costs
1/guard_weight**2 of what any component does, so the labels must bring evidence to move away from it. The
weight 3 was chosen among 1, 3 and 10 on benchmark pools and checked on fresh draws (docs/detectors.md).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_array, check_is_fitted

from .base import ContaminationEstimate, semi_supervised_labels
from .model_guard import ModelGuardScorer


class ModelGuidedProbeScorer(BaseEstimator):
    """Logistic regression on [top principal components of the model's features, the label-free detector's
    classifier score, its student score].

    X is the label-free detector's view (sentence-encoder columns, then the hidden states at each of
    `positions`); the components are those of the first position's block. `fit(X, y, reference_X=,
    reference_y=)`: y holds 1, 0 or -1 (unlabelled); every row shapes the principal components and the label-free
    detector, only labelled rows train the regression.

    Parameters
    ----------
    positions : tuple of str, default=("prompt_last", "response_mean")
        The token positions of X's hidden-state blocks.
    n_components : int, default=32
    C : float, default=0.1
    guard_weight : float, default=3.0
        Scale of each standardised guide input (a prior towards the label-free detector; 1 = no prior).
    weights, kernel
        The packaged guard whose label-free estimate sizes the student and is the calibrated rule's prior.
    """

    def __init__(self, positions: tuple[str, ...] = ("prompt_last", "response_mean"), n_components: int = 32,
                 C: float = 0.1, guard_weight: float = 3.0, weights: str | None = None, kernel: str = "rbf"):
        self.positions = positions
        self.n_components = n_components
        self.C = C
        self.guard_weight = guard_weight
        self.weights = weights
        self.kernel = kernel

    def _inputs(self, X):
        H = self.guide_.hidden_block(X)
        return np.column_stack([self.pca_.transform(self.scaler_.transform(H)), *self.guide_.part_scores(X)])

    def fit(self, X, y=None, *, reference_X=None, reference_y=None, refusal=None):
        X = check_array(X, dtype=np.float64)
        if not self.guard_weight > 0:
            raise ValueError(f"guard_weight must be positive, got {self.guard_weight}")
        y, labelled = semi_supervised_labels(y, "the labelled detector")
        self.guide_ = ModelGuardScorer(positions=self.positions, weights=self.weights, kernel=self.kernel).fit(
            X, reference_X=reference_X, reference_y=reference_y, refusal=refusal)
        H = self.guide_.hidden_block(X)
        self.scaler_ = StandardScaler().fit(H)
        k = min(self.n_components, X.shape[0] - 1, H.shape[1])
        self.pca_ = PCA(n_components=k, random_state=0).fit(self.scaler_.transform(H))
        F = self._inputs(X)
        self.n_guides_ = F.shape[1] - k
        self.input_scaler_ = StandardScaler().fit(F)
        self.probe_ = LogisticRegression(C=self.C, class_weight="balanced", max_iter=5000).fit(
            self._scaled(F[labelled]), y[labelled])
        self.n_features_in_ = X.shape[1]
        return self

    def _scaled(self, F):
        F = self.input_scaler_.transform(F)
        F[:, -self.n_guides_:] *= self.guard_weight  # the prior towards the guide (see the module's docstring)
        return F

    def score_samples(self, X) -> np.ndarray:
        """Log-odds of harmful: higher = more suspicious."""
        check_is_fitted(self, "probe_")
        X = check_array(X, dtype=np.float64)
        return self.probe_.decision_function(self._scaled(self._inputs(X)))

    def contamination_estimate(self, X, *, refusal=None) -> ContaminationEstimate:
        """The packaged guard's label-free estimate of X: the calibrated rule's prior."""
        check_is_fitted(self, "probe_")
        return self.guide_.contamination_estimate(X, refusal=refusal)
