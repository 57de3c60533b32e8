"""A probe guided by the guard: a few labels on top of the label-free guard-knn score (not in the paper).

The probe (`ProbeScorer`) learns a direction from ~100 labels in the pool's top principal components of the
model's features: excellent where harmful rows differ in kind from the rest of the pool (task data), weak where
they do not (BeaverTails: safe and unsafe answers to the same kind of question). The guard brings outside
knowledge of harm and is best exactly there. This detector gives the probe the guard-knn score as one more
input, so the labels decide how much to trust each.

With ~100 labels the regression cannot average out 32 noisy directions: on BeaverTails, where the model's
components hold little, the unweighted probe scored below guard-knn alone (AUROC 0.797 / 0.755 against 0.847 /
0.790 on B10 / B30). `guard_weight` multiplies the guard-knn input after standardising, which under the
regression's L2 penalty is a prior: the guard's direction costs 1/guard_weight**2 of what any component does, so
the labels must bring evidence to move away from it. The default 3 was chosen on the seed-0 T and B pools (1, 3
and 10 tried; 10 lost up to 0.01 on T and H) and confirmed on pool seeds 1 and 2 (benchmarks/RESULTS.md,
detect-plus and the targets reading).

guard-model-probe (`ModelGuidedProbeScorer`, the labelled default since session 8) is the same probe guided by
guard-model instead: its classifier (the guard's recipe retrained on the guard's rows in the model's view) and
its student (a probe on the pool taught by the classifier's surest calls) enter as two inputs, each with the same
prior weight, so the labels decide between the classifier, which is best where safe and unsafe rows share their
questions (BeaverTails), and the student, which is best on task data. On three draws of every benchmark pool it
is above guard-probe on every B draw (+0.038 to +0.069 AUROC), level with it on the held-out H pools (-0.001 to
+0.014) and below it on one T draw of six, by 0.004 (benchmarks/RESULTS.md, detect-plus and calibrated-prior). Feeding
guard-model's summed score as one input instead was 0.012-0.021 lower on B; adding guard-knn as a third input
was better on one pool (+0.004) and worse by up to 0.011 elsewhere (an ad hoc comparison on the same pools, not
committed).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_array, check_is_fitted

from .guard import GuardKNNScorer
from .model_guard import ModelGuardScorer
from .probe import semi_supervised_labels


class GuidedProbeScorer(BaseEstimator):
    """Logistic regression on [top principal components of the model's features, guard-knn score].

    X is the "both" view (sentence-encoder columns, then hidden states), as for `GuardKNNScorer`.
    `fit(X, y)`: y holds 1, 0 or -1 (unlabelled); every row shapes the principal components and the guard-knn
    neighbourhoods, only labelled rows train the regression.

    Parameters
    ----------
    n_components : int, default=32
    C : float, default=0.1
    guard_weight : float, default=3.0
        Scale of the standardised guard-knn input (a prior towards the guard; 1 = no prior).
    n_neighbors, weights, kernel
        Passed to the guard-knn score (`GuardKNNScorer`).
    """

    view = "both"
    name = "guard-probe"  # in error messages

    def __init__(self, n_components: int = 32, C: float = 0.1, guard_weight: float = 3.0, n_neighbors: int = 10,
                 weights: str | None = None, kernel: str = "rbf"):
        self.n_components = n_components
        self.C = C
        self.guard_weight = guard_weight
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.kernel = kernel

    def _fit_guide(self, X):
        """Fit the label-free guide on the pool; return the hidden states whose components the probe reads."""
        self.guard_ = GuardKNNScorer(n_neighbors=self.n_neighbors, weights=self.weights, kernel=self.kernel).fit(X)
        return self.guard_.split_views(X)[1]

    def _guide(self, X) -> tuple[np.ndarray, list[np.ndarray]]:
        """(hidden states for the components, the guide's score columns) of X."""
        return self.guard_.split_views(X)[1], [self.guard_.score_samples(X)]

    def _inputs(self, X):
        H, guides = self._guide(X)
        return np.column_stack([self.pca_.transform(self.scaler_.transform(H))] + guides)

    def fit(self, X, y=None, **fit_kw):
        X = check_array(X, dtype=np.float64)
        if not self.guard_weight > 0:
            raise ValueError(f"guard_weight must be positive, got {self.guard_weight}")
        y, labelled = semi_supervised_labels(y, self.name)
        H = self._fit_guide(X, **fit_kw)
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

    def label_free_estimate_with_se(self, X) -> tuple[float, float]:
        """The guard's label-free contamination estimate of X and its standard error (`GuardScorer`): the prior
        of the calibrated rule. Not named `contamination_estimate`, so that the detector keeps the calibrated rule
        by default instead of the label-free estimate rule."""
        check_is_fitted(self, "probe_")
        return self.guard_.contamination_estimate_with_se(X)


class ModelGuidedProbeScorer(GuidedProbeScorer):
    """Logistic regression on [top principal components of the model's features, guard-model's classifier score,
    guard-model's student score].

    X is guard-model's view (sentence-encoder columns, then the hidden states at each of `positions`); the
    components are those of the first position's block. `fit(X, y, reference_X=, reference_y=)`: y holds 1, 0 or
    -1 (unlabelled), and guard-model is fitted on the pool and the guard's rows (`saft.reference`) first.

    Parameters
    ----------
    positions : tuple of str, default=("prompt_last", "response_mean")
        The token positions of X's hidden-state blocks (guard-model's).
    n_components : int, default=32
    C : float, default=0.1
    guard_weight : float, default=3.0
        Scale of each standardised guide input (a prior towards guard-model; 1 = no prior).
    weights, kernel
        The packaged guard whose label-free estimate sizes guard-model's student and is the calibrated rule's prior.
    """

    view = "both"
    needs_reference = True
    name = "guard-model-probe"

    def __init__(self, positions: tuple[str, ...] = ("prompt_last", "response_mean"), n_components: int = 32,
                 C: float = 0.1, guard_weight: float = 3.0, weights: str | None = None, kernel: str = "rbf"):
        self.positions = positions
        self.n_components = n_components
        self.C = C
        self.guard_weight = guard_weight
        self.weights = weights
        self.kernel = kernel

    def _fit_guide(self, X, *, reference_X=None, reference_y=None):
        self.guide_ = ModelGuardScorer(positions=self.positions, weights=self.weights, kernel=self.kernel).fit(
            X, reference_X=reference_X, reference_y=reference_y)
        return self.guide_.hidden_block(X)

    def _guide(self, X):
        return self.guide_.hidden_block(X), list(self.guide_.part_scores(X))

    def label_free_estimate_with_se(self, X) -> tuple[float, float]:
        """guard-model's (the packaged guard's) label-free estimate of X and its standard error: the calibrated
        rule's prior."""
        check_is_fitted(self, "probe_")
        return self.guide_.contamination_estimate_with_se(X)
