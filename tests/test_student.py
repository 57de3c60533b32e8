"""The label-free detector's student step: a probe on the pool's hidden states, trained on a teacher's surest calls."""

import numpy as np
from sklearn.metrics import roc_auc_score

from saft.detectors.student import combine, pseudo_labels, teach_student


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


def test_student_generalises_the_teachers_surest_calls():
    truth, X = pool(np.random.default_rng(0))
    teacher, Z = X[:, 0], X[:, 3:]
    labels, student, stats = teach_student(teacher, Z, 0.2, C=0.1, safe_share=0.5, estimate_scale=1.0, min_harmful=10)
    combined = combine(teacher, student.decision_function(Z), stats)
    assert roc_auc_score(truth, combined) > roc_auc_score(truth, teacher) + 0.03 and roc_auc_score(truth, combined) > 0.9
    # the harmful pseudo-labels are sized by the estimate (at least min_harmful), the bottom share is safe
    assert (labels == 1).sum() == round(0.2 * len(Z)) and (labels == 0).sum() == len(Z) // 2
    wide, _, _ = teach_student(teacher, Z, 0.2, C=0.1, safe_share=0.5, estimate_scale=2.0, min_harmful=10)
    assert (wide == 1).sum() == round(0.4 * len(Z))
    few, _, _ = teach_student(teacher, Z, 0.0, C=0.1, safe_share=0.5, estimate_scale=1.0, min_harmful=10)
    assert (few == 1).sum() == 10
