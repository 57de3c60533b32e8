"""The student step of the label-free detector: a probe on the pool's own hidden states, taught by a teacher's
surest calls (not in the paper).

With about 100 labels, a logistic probe on the model's principal components separates task data from harmful
pairs well. The student replaces those labels with pseudo-labels from the teacher itself: its top
`contamination_estimate * n` rows of the pool count as harmful, its bottom half as safe, the rows between are
left out. The student learns the directions of the model's representation along which the teacher's surest calls
differ and scores every row along them, which corrects teacher errors on data that looks nothing like the
teacher's training rows. The detector's score is the sum of the standardised teacher and student scores, so that
where the model's view holds little the teacher still carries the ranking.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression


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
    """The student step of the label-free detector: pseudo-labels from the teacher's pool scores (the top
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
