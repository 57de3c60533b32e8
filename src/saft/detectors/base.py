"""What every detector shares: the contamination estimate it may give, and the check of semi-supervised labels.

The protocol (sklearn-style): `fit(X, y=None, *, reference_X=None, reference_y=None)` returns self, where y holds
1 (harmful), 0 (safe) or -1 (unlabelled) for detectors that learn from labels and is ignored by the others, and
reference rows are the guard's labelled rows in the same view for detectors that train on them;
`score_samples(X)`, higher = more suspicious; and, for detectors that can size their own removal without labels
or give the calibrated rule a prior, `contamination_estimate(X) -> ContaminationEstimate`. The detectors built on
the guard take the rows' refusal mask as `refusal=` in `fit` and `contamination_estimate` (`saft.regions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ContaminationEstimate:
    """A label-free estimate of the harmful share of a pool.

    `se` is the sampling standard error of the count alone; `interval` (lo, hi) at `level`, when given, also
    covers the shift between the pool and the rows the estimator learned from (see `saft.trust`). `flagged`: for
    a count-based estimate, the share of the pool its models flagged before the adjustment (trust's input).
    """

    value: float
    se: float | None = None
    interval: tuple[float, float] | None = None
    level: float | None = None
    flagged: float | None = None

    def as_dict(self) -> dict:
        out = {"contamination_estimate": float(self.value)}
        if self.se is not None:
            out["contamination_estimate_se"] = float(self.se)
        if self.interval is not None:
            out["contamination_interval"] = [float(self.interval[0]), float(self.interval[1])]
            out["interval_level"] = self.level
        return out


def semi_supervised_labels(y, who: str) -> tuple[np.ndarray, np.ndarray]:
    """(y, labelled mask) for a detector trained on the labelled rows of y (1, 0, or -1 for unlabelled)."""
    if y is None:
        raise ValueError(f"{who} needs labels: fit(X, y) with y in {{1, 0, -1 for unlabelled}}")
    y = np.asarray(y)
    labelled = y >= 0
    if len(set(y[labelled].tolist())) < 2:
        raise ValueError(f"{who} needs at least one harmful (1) and one safe (0) labelled row")
    return y, labelled
