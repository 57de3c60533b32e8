"""guard-student: a probe on the pool's own hidden states, taught by guard-knn's surest calls (label-free; not in
the paper).

With about 100 labels, a logistic probe on the model's principal components separates task data from harmful
pairs better than the label-free guard-knn does (benchmarks/detect_plus.py, T10: the probe 0.961 on all rows,
guard-knn 0.948 on the rows the guard never saw). This detector replaces those labels with pseudo-labels from
guard-knn itself: its top `contamination_estimate * n` rows of the pool count as harmful, its bottom half as
safe, the rows between are left out. The student (the
same kind of probe) learns the directions of the model's representation along which the teacher's surest calls
differ, and scores every row along them, which corrects teacher errors that neighbourhood smoothing cannot reach.
The score is the sum of the standardised teacher and student scores, so that where the model's view holds little
(BeaverTails, safe and unsafe answers to the same questions) the teacher still carries the ranking.

The student's settings (C 0.1, the bottom half as safe, the teacher's estimate as the number of harmful
pseudo-labels: `estimate_scale` 1) were fixed before any benchmark run; benchmarks/guard_student_sweep.py shows
how much other choices would move the AUROC.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_array, check_is_fitted

from .guard import GuardKNNScorer


def pseudo_labels(teacher_scores: np.ndarray, n_harmful: int, *, safe_share: float) -> np.ndarray:
    """1 for the `n_harmful` highest scores, 0 for the lowest `safe_share` of rows, -1 (left out) in between.

    The two groups never overlap (`n_harmful` is capped at the rows above the safe share) and, from two rows on,
    neither is empty.
    """
    n = len(teacher_scores)
    n_safe = min(max(int(round(n * safe_share)), 1), n - 1)
    n_harmful = max(min(n_harmful, n - n_safe), 1)
    order = np.argsort(-teacher_scores, kind="stable")
    labels = np.full(n, -1)
    labels[order[:n_harmful]] = 1
    labels[order[n - n_safe:]] = 0
    return labels


def teach_student(teacher: np.ndarray, Z: np.ndarray, estimate: float, *, C: float, safe_share: float,
                  estimate_scale: float, min_harmful: int):
    """The student step of guard-student and guard-model: pseudo-labels from the teacher's pool scores (the top
    `estimate_scale * estimate` share harmful, at least `min_harmful` rows; the bottom `safe_share` safe), a
    balanced logistic probe on the pool's components `Z` trained on them, and the pool's (mean, sd) of teacher and
    student scores, for `combine`. Returns (pseudo_labels, student, stats)."""
    n_harmful = max(int(round(estimate_scale * estimate * len(teacher))), min_harmful, 1)
    labels = pseudo_labels(teacher, n_harmful, safe_share=safe_share)
    taught = labels >= 0
    student = LogisticRegression(C=C, class_weight="balanced", max_iter=5000).fit(Z[taught], labels[taught])
    scores = student.decision_function(Z)
    return labels, student, (teacher.mean(), teacher.std() or 1.0, scores.mean(), scores.std() or 1.0)


def combine(teacher: np.ndarray, student: np.ndarray, stats: tuple) -> np.ndarray:
    """Standardised teacher score + standardised student score, with the pool's statistics from `teach_student`."""
    tm, ts, sm, ss = stats
    return (teacher - tm) / ts + (student - sm) / ss


class GuardStudentScorer(BaseEstimator):
    """guard-knn (teacher) + a logistic probe on the pool's principal components trained on its pseudo-labels.

    X is the "both" view (sentence-encoder columns, then hidden states), as for `GuardKNNScorer`. `fit(X)` needs
    no labels: it fits the teacher on X, takes the teacher's contamination estimate of X to size the harmful
    pseudo-labels (at least `min_harmful`), and trains the student on the teacher's principal components of X.

    Parameters
    ----------
    C : float, default=0.1
        Inverse regularisation of the student.
    safe_share : float, default=0.5
        Share of the pool, lowest teacher scores first, taken as safe.
    estimate_scale : float, default=1.0
        Rows taken as harmful, as a multiple of the teacher's contamination estimate times the pool size.
    min_harmful : int, default=10
        Fewest rows taken as harmful, so that a pool the teacher thinks clean still trains a student.
    n_neighbors, n_components, weights, kernel
        Passed to the teacher (`GuardKNNScorer`); the student reads the same `n_components` components.
    """

    view = "both"

    def __init__(self, C: float = 0.1, safe_share: float = 0.5, estimate_scale: float = 1.0, min_harmful: int = 10,
                 n_neighbors: int = 10, n_components: int = 64, weights: str | None = None, kernel: str = "rbf"):
        self.C = C
        self.safe_share = safe_share
        self.estimate_scale = estimate_scale
        self.min_harmful = min_harmful
        self.n_neighbors = n_neighbors
        self.n_components = n_components
        self.weights = weights
        self.kernel = kernel

    def _components(self, X):
        _, H = self.teacher_.split_views(X)
        return self.teacher_.pca_.transform(self.teacher_.scaler_.transform(H))

    def fit(self, X, y=None):
        X = check_array(X, dtype=np.float64)
        if not 0 < self.safe_share < 1:
            raise ValueError(f"safe_share must be between 0 and 1, got {self.safe_share}")
        if self.C <= 0 or self.estimate_scale <= 0:
            raise ValueError(f"C and estimate_scale must be positive, got C={self.C}, estimate_scale={self.estimate_scale}")
        if X.shape[0] < 2:
            raise ValueError(f"guard-student needs at least 2 rows to teach its student, got {X.shape[0]}; "
                             "to score a single sample, use the guard alone (--detector guard)")
        self.teacher_ = GuardKNNScorer(n_neighbors=self.n_neighbors, n_components=self.n_components,
                                       weights=self.weights, kernel=self.kernel).fit(X)
        teacher = self.teacher_.score_samples(X)
        self.pseudo_labels_, self.student_, self.stats_ = teach_student(
            teacher, self._components(X), self.teacher_.contamination_estimate(X), C=self.C,
            safe_share=self.safe_share, estimate_scale=self.estimate_scale, min_harmful=self.min_harmful)
        self.n_features_in_ = X.shape[1]
        return self

    def score_samples(self, X) -> np.ndarray:
        """Standardised teacher score + standardised student score: higher = more suspicious."""
        check_is_fitted(self, "student_")
        X = check_array(X, dtype=np.float64)
        return combine(self.teacher_.score_samples(X), self.student_.decision_function(self._components(X)), self.stats_)

    def contamination_estimate(self, X) -> float:
        """The guard's label-free estimate (from the sentence-encoder columns of X)."""
        check_is_fitted(self, "student_")
        return self.teacher_.contamination_estimate(X)

    def contamination_estimate_with_se(self, X) -> tuple[float, float]:
        check_is_fitted(self, "student_")
        return self.teacher_.contamination_estimate_with_se(X)
