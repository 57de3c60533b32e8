"""label-free, the default without labels: the guard retrained in the fine-tuned model's own view, plus a student
on the pool (not in the paper).

The packaged guard learned harmful-vs-safe from 2306 public rows in a sentence encoder's view only; on
BeaverTails, where safe and unsafe answers share their questions and topics, that view tops out at AUROC
0.80-0.86 even with every label of the pool added (benchmarks/RESULTS.md, detect-plus ceilings).
The model about to be fine-tuned reads the same rows differently: its hidden state at the last prompt token
says what is asked, its mean over the response says what is answered. This detector trains the guard's own recipe
(an RBF support vector machine, C 1, gamma 'scale', balanced classes; settings fixed before any pool was
scored) on the guard's rows (`saft.reference`) in the view [sentence view, hidden states at `positions`],
standardised so that the hidden states' large columns do not swamp the sentence view. The view was chosen by
grouped cross-validation on the guard's rows alone (AUROC 0.923 sentence view, 0.932 + prompt_last, 0.942 +
response_mean, 0.945 both), not on the benchmark pools.

A student (`saft.detectors.student`) then learns from the classifier's surest calls on the pool itself (its top
`estimate * n` rows as harmful, its bottom half as safe): a logistic probe on the pool's principal components of
the hidden states at the first position, which corrects errors the outside rows cannot (task data that looks
nothing like them). The score is the sum of the two standardised scores.

Pools beyond memory: X may be a chunked source (`saft.chunks`); the classifier and the guard score it a block at
a time, and the pool PCA and the student are fitted on a seeded random sample of at most `max_fit_values` values
(rows x hidden width: 34k rows of the embedded model's 576, 4.9k of a 7B model's 4096; every row of a smaller
pool), so memory is bounded by the sample, not the pool.

The contamination estimate is the packaged guard's (`GuardScorer`, on the sentence columns), whose adjusted count
was tuned for its classifier; the same count from this classifier's fold models was no closer to the truth on the
benchmark pools (BeaverTails 30%: 0.42 against the guard's 0.39, truth 0.32).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.validation import check_array, check_is_fitted

from ..chunks import Columns, is_out_of_core, map_chunks, n_rows, take
from .base import ContaminationEstimate
from .guard import GuardScorer
from .student import combine, teach_student


def fit_rows(n: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Every row of a pool of at most `max_rows`, else a sorted random sample of `max_rows` of them."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def fit_pool_student(H, teacher: np.ndarray, estimate: float, *, n_components: int, max_fit_rows: int, C: float,
                     safe_share: float, estimate_scale: float, min_harmful: int):
    """The pool-side steps of guard-model: standardise + PCA of the hidden states H, and the student taught by
    the teacher's pool scores, both fitted on `fit_rows` of the pool. Returns (rows, components, (pseudo-labels,
    student, stats))."""
    rows = fit_rows(n_rows(H), max_fit_rows)
    H_fit = take(H, rows)
    k = max(min(n_components, len(rows) - 1, H_fit.shape[1]), 1)
    components = make_pipeline(StandardScaler(), PCA(n_components=k, random_state=0)).fit(H_fit)
    taught = teach_student(np.asarray(teacher)[rows], components.transform(H_fit), estimate, C=C,
                           safe_share=safe_share, estimate_scale=estimate_scale, min_harmful=min_harmful)
    return rows, components, taught


def score_pool_student(H, components, student, chunk_rows: int = 8192) -> np.ndarray:
    """The student's decision function on every row of H, a chunk at a time."""
    return map_chunks(lambda c: student.decision_function(components.transform(c)), H, chunk_rows)


class ModelGuardScorer(BaseEstimator):
    """The guard's recipe trained on the guard's rows in the model's view, taught on to a student on the pool.

    X is the "both" view with one hidden-state block per position: the sentence-encoder columns (768), then the
    model's hidden states at each of `positions`, in that order (`saft.filter_dataset` builds it). `fit(X,
    reference_X=, reference_y=)` needs the guard's rows in the same view (`saft.reference.reference_view`) and no
    label from the pool.

    Parameters
    ----------
    positions : tuple of str, default=("prompt_last", "response_mean")
        The token positions of X's hidden-state blocks; the student reads the first.
    C : float, default=1.0
        The classifier's C (the packaged guard's).
    student_C : float, default=0.1
    safe_share : float, default=0.5
    estimate_scale : float, default=1.0
    min_harmful : int, default=10
    n_components : int, default=64
        The student's settings (`saft.detectors.student.teach_student`): its C, the share of the pool taken as
        safe, the harmful rows as a multiple of the guard's estimate, and the fewest harmful rows.
    weights : str or None, default=None
    kernel : {"rbf", "linear"}, default="rbf"
        The packaged guard whose contamination estimate sizes the student's harmful rows and the estimate rule.
    max_fit_values : int, default=20_000_000
        The most values (rows x hidden width, 160 MB of float64) the PCA and the student are fitted on: a seeded
        random sample of max_fit_values // width rows beyond it.

    Attributes beyond the fitted parts: `fit_rows_`, the pool rows the PCA and student were fitted on, which
    `pseudo_labels_` labels.
    """

    def __init__(self, positions: tuple[str, ...] = ("prompt_last", "response_mean"), C: float = 1.0,
                 student_C: float = 0.1, safe_share: float = 0.5, estimate_scale: float = 1.0, min_harmful: int = 10,
                 n_components: int = 64, weights: str | None = None, kernel: str = "rbf",
                 max_fit_values: int = 20_000_000):
        self.positions = positions
        self.C = C
        self.student_C = student_C
        self.safe_share = safe_share
        self.estimate_scale = estimate_scale
        self.min_harmful = min_harmful
        self.n_components = n_components
        self.weights = weights
        self.kernel = kernel
        self.max_fit_values = max_fit_values

    def _split(self, X):
        """(sentence-encoder columns, hidden states at the first position) of X."""
        width = len(self.guard_.coef_)
        hidden = X.shape[1] - width
        if hidden <= 0 or hidden % len(self.positions):
            raise ValueError(f"label-free reads the sentence-encoder view ({width} columns) followed by the "
                             f"model's hidden states at {len(self.positions)} positions ({', '.join(self.positions)}); "
                             f"got {X.shape[1]} columns")
        if is_out_of_core(X):
            return Columns(X, 0, width), Columns(X, width, width + hidden // len(self.positions))
        return X[:, :width], X[:, width:width + hidden // len(self.positions)]

    def _classifier_scores(self, X) -> np.ndarray:
        return map_chunks(self.classifier_.decision_function, X, 8192)

    def fit(self, X, y=None, *, reference_X=None, reference_y=None, refusal=None):
        X = X if is_out_of_core(X) else check_array(X, dtype=[np.float64, np.float32])
        if reference_X is None or reference_y is None:
            raise ValueError("label-free trains on the guard's rows in the model's view: pass reference_X and "
                             "reference_y from saft.reference.reference_view (saft filter does this)")
        reference_X = check_array(reference_X, dtype=np.float64)
        reference_y = np.asarray(reference_y)
        if reference_X.shape[1] != X.shape[1]:
            raise ValueError(f"the guard's rows have {reference_X.shape[1]} columns but the pool has {X.shape[1]}; "
                             "compute both with the same model, layer and positions")
        if set(np.unique(reference_y)) != {0, 1}:
            raise ValueError("reference_y must hold both classes, 0 (safe) and 1 (harmful)")
        if not 0 < self.safe_share < 1:
            raise ValueError(f"safe_share must be between 0 and 1, got {self.safe_share}")
        if min(self.C, self.student_C, self.estimate_scale) <= 0:
            raise ValueError("C, student_C and estimate_scale must be positive")
        if self.max_fit_values < 2:
            raise ValueError(f"max_fit_values must be at least 2, got {self.max_fit_values}")
        if X.shape[0] < 2:
            raise ValueError(f"label-free needs at least 2 rows to teach its student, got {X.shape[0]}; "
                             "to score a single sample, use the guard alone (--detector guard)")
        self.guard_ = GuardScorer(weights=self.weights, kernel=self.kernel).load_weights()
        S, H = self._split(X)
        self.classifier_ = make_pipeline(StandardScaler(), SVC(C=self.C, kernel="rbf", gamma="scale",
                                                               class_weight="balanced")).fit(reference_X, reference_y)
        self.fit_rows_, self.components_, (self.pseudo_labels_, self.student_, self.stats_) = fit_pool_student(
            H, self._classifier_scores(X), self.guard_.contamination_estimate(S, refusal=refusal).value, n_components=self.n_components,
            max_fit_rows=max(2, self.max_fit_values // H.shape[1]), C=self.student_C, safe_share=self.safe_share,
            estimate_scale=self.estimate_scale, min_harmful=self.min_harmful)
        self.n_features_in_ = X.shape[1]
        return self

    def part_scores(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(classifier score, student score) of X, unscaled: the labelled detector weighs the two with labels."""
        check_is_fitted(self, "student_")
        X = X if is_out_of_core(X) else check_array(X, dtype=[np.float64, np.float32])
        _, H = self._split(X)
        return self._classifier_scores(X), score_pool_student(H, self.components_, self.student_)

    def hidden_block(self, X) -> np.ndarray:
        """The hidden states at the first position (the student's input) of X."""
        return self._split(check_array(X, dtype=np.float64))[1]

    def score_samples(self, X) -> np.ndarray:
        """Standardised classifier score + standardised student score: higher = more suspicious."""
        return combine(*self.part_scores(X), self.stats_)

    def contamination_estimate(self, X, *, refusal=None) -> ContaminationEstimate:
        """The packaged guard's label-free estimate (from the sentence-encoder columns of X; `refusal` as in
        `GuardScorer.contamination_estimate`)."""
        check_is_fitted(self, "student_")
        X = X if is_out_of_core(X) else check_array(X, dtype=[np.float64, np.float32])
        return self.guard_.contamination_estimate(self._split(X)[0], refusal=refusal)
