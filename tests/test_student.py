"""guard-student: a probe on the pool's hidden states, trained on guard-knn's surest calls."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from test_guard import weights_file
from saft.detectors import default_rule, detector_view, get_detector
from saft.detectors.student import pseudo_labels


def test_pseudo_labels_take_the_top_as_harmful_and_the_bottom_share_as_safe():
    scores = np.array([0.5, 3.0, -1.0, 2.0, 0.0, -2.0, 1.0, -0.5])
    assert pseudo_labels(scores, 2, safe_share=0.5).tolist() == [-1, 1, 0, 1, 0, 0, -1, 0]
    # the harmful group is capped so that the two never overlap, and neither group is ever empty
    assert pseudo_labels(scores, 10, safe_share=0.5).tolist() == [1, 1, 0, 1, 0, 0, 1, 0]
    assert pseudo_labels(scores[:2], 0, safe_share=0.1).tolist() == [0, 1]


def pool(rng, n=300):
    """Harmful rows (1 in 5) lie along one direction of the model's view; the guard sees them through heavy
    noise, except for a few it is sure of."""
    truth = (np.arange(n) % 5 == 0).astype(int)
    H = rng.normal(size=(n, 10))
    H[:, 0] += 2.5 * truth
    guard = 1.5 * truth + rng.normal(size=n)
    return truth, np.hstack([guard[:, None] * np.array([[1.0, 0, 0]]), H])


def test_student_generalises_the_teachers_surest_calls(tmp_path):
    truth, X = pool(np.random.default_rng(0))
    w = weights_file(tmp_path, [1, 0, 0], -1.0, 0.8, 0.2)
    knn = get_detector("guard-knn", n_neighbors=5, n_components=6, weights=w, kernel="linear").fit(X)
    det = get_detector("guard-student", n_components=6, n_neighbors=5, weights=w, kernel="linear")
    assert det.fit(X) is det and det.student_ is not None
    auc_teacher, auc = roc_auc_score(truth, knn.score_samples(X)), roc_auc_score(truth, det.score_samples(X))
    assert auc > auc_teacher + 0.03 and auc > 0.9
    # the harmful pseudo-labels are sized by the teacher's own estimate, which the detector reports unchanged
    est = knn.contamination_estimate(X)
    assert (det.pseudo_labels_ == 1).sum() == max(round(est * len(X)), 10)
    assert (det.pseudo_labels_ == 0).sum() == len(X) // 2
    wide = get_detector("guard-student", n_components=6, n_neighbors=5, weights=w, kernel="linear", estimate_scale=2.0).fit(X)
    assert (wide.pseudo_labels_ == 1).sum() == max(round(2 * est * len(X)), 10)
    assert det.contamination_estimate(X) == est and det.contamination_estimate_with_se(X) == knn.contamination_estimate_with_se(X)
    assert detector_view("guard-student") == "both" and default_rule("guard-student") == "estimate"


def test_student_checks_its_settings(tmp_path):
    truth, X = pool(np.random.default_rng(1), n=40)
    w = weights_file(tmp_path, [1, 0, 0], 0.0, 0.8, 0.2)
    with pytest.raises(ValueError, match="safe_share"):
        get_detector("guard-student", safe_share=1.0, weights=w, kernel="linear").fit(X)
    with pytest.raises(ValueError, match="C and estimate_scale must be positive"):
        get_detector("guard-student", C=0, weights=w, kernel="linear").fit(X)
    with pytest.raises(ValueError, match="C and estimate_scale must be positive"):
        get_detector("guard-student", estimate_scale=-1, weights=w, kernel="linear").fit(X)
    with pytest.raises(ValueError, match="at least 2 rows"):
        get_detector("guard-student", weights=w, kernel="linear").fit(X[:1])
    # from two rows on there is a harmful and a safe pseudo-label, so tiny inputs still work
    for n in (2, 3):
        det = get_detector("guard-student", weights=w, kernel="linear", n_components=2).fit(X[:n])
        assert {0, 1} <= set(det.pseudo_labels_.tolist()) and np.isfinite(det.score_samples(X[:n])).all()
