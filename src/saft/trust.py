"""How far a label-free run can be trusted: an interval for the contamination estimate, and a measured distance
between the pool and the rows the guard learned from.

What makes the guard's adjusted count miss is not the pool's sampling noise but a shift: a pool's safe rows can
cross the guard's threshold more (or less) often than the training safe rows did, and its harmful rows can be
harder (or easier) to catch. Guard v2 measures how much that moves between source families: each of its fold
models was trained without one family, and the per-family rates of those folds at the estimate's threshold
(`saft.guard_training.family_rates`) are what a new family did to the guard. `estimate_interval` inverts the
adjusted count over the range of those rates (plus the binomial noise of the pool's count), so its width is the
spread of unseen-family behaviour, not the pool's size.

`pool_distance` is each pool row's cosine distance to its nearest row of the guard's reference set (the final
model's support vectors, in the sentence view), summarised by the median over the pool; `distance_threshold`
is the highest the same statistic reached on held-out rows of the guard's own families (rows no guard trained
on). A pool above it is unlike everything the guard learned from.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

LEVEL = 0.9
WIDE = 0.10  # an interval wider than twice the benchmark's removal tolerance (0.05) cannot keep its promise
ADVICE = ("label about 100 rows (a label field, or --labels-file) and rerun: the calibrated rule then sizes the "
          "removal from the labels")


def rate_ranges(rates: dict) -> dict:
    """The range of per-family rates: {"tpr": [lowest, highest], "fpr": [lowest, highest]} over the families that
    have rows of that class (`saft.guard_training.family_rates`)."""
    tprs = [r["tpr"] for r in rates.values() if r.get("tpr") is not None]
    fprs = [r["fpr"] for r in rates.values() if r.get("fpr") is not None]
    if not tprs or not fprs:
        raise ValueError("the guard's family rates need at least one family with harmful rows and one with safe rows")
    return {"tpr": [float(min(tprs)), float(max(tprs))], "fpr": [float(min(fprs)), float(max(fprs))]}


def estimate_interval(flagged: float, n: int, ranges: dict, *, level: float = LEVEL) -> tuple[float, float]:
    """[lo, hi] for the harmful share of a pool of `n` rows of which a `flagged` share crossed the threshold.

    The pool's own rates are unknown; the interval takes the adjusted count at its extremes over the measured
    ranges (`rate_ranges`): lo at the highest false-positive and true-positive rates, hi at the lowest, each
    with the flagged share moved by the normal quantile of `level` times its binomial standard error.
    """
    if not 0 <= flagged <= 1:
        raise ValueError(f"flagged must be a share in [0, 1], got {flagged}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = float(norm.ppf(0.5 + level / 2))
    se = float(np.sqrt(max(flagged * (1 - flagged), 1.0 / n) / n))  # 1/n floor: a count of 0 is not certain
    (t_lo, t_hi), (f_lo, f_hi) = ranges["tpr"], ranges["fpr"]
    lo = (flagged - z * se - f_hi) / max(t_hi - f_hi, 1e-9)
    hi = (flagged + z * se - f_lo) / max(t_lo - f_lo, 1e-9)
    return float(np.clip(lo, 0, 1)), float(np.clip(hi, 0, 1))


def nearest_distances(X, reference) -> np.ndarray:
    """Each row's cosine distance to its nearest reference row (rows need not be normalised)."""
    from .chunks import iter_chunks

    R = np.asarray(reference, dtype=np.float64)
    R = R / np.maximum(np.linalg.norm(R, axis=1, keepdims=True), 1e-12)
    out = []
    for block in iter_chunks(X, 2048):  # a block at a time: the pool's view may be a file of any size
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        out.append(1.0 - (block @ R.T).max(axis=1))
    return np.concatenate(out) if out else np.zeros(0)


def pool_distance(X, reference) -> float:
    """The pool's distance to the reference set: the median of its rows' nearest-neighbour cosine distances."""
    if len(X) == 0:
        raise ValueError("cannot measure the distance of an empty pool")
    return float(np.median(nearest_distances(X, reference)))


def distance_threshold(heldout: dict, reference, *, pool_size: int = 300, draws: int = 20, seed: int = 0) -> dict:
    """The distance above which a pool is unlike the guard's training rows: the highest `pool_distance` of
    `draws` pools of `pool_size` rows drawn from each family's held-out rows (`heldout`: family -> X).
    Returns {"threshold": t, "per_family": {family: highest}}."""
    rng = np.random.default_rng(seed)
    per = {}
    for fam, X in heldout.items():
        d = nearest_distances(X, reference)
        m = min(pool_size, len(d))
        per[fam] = float(max(np.median(rng.choice(d, m, replace=False)) for _ in range(draws)))
    if not per:
        raise ValueError("distance_threshold needs held-out rows of at least one family")
    return {"threshold": max(per.values()), "per_family": per}


def assess(estimate: float, flagged: float, n: int, ranges: dict, *, distance: float, threshold: float,
           level: float = LEVEL, wide: float = WIDE) -> dict:
    """The trust block of summary.json: interval, distance, the two warnings and the advice."""
    lo, hi = estimate_interval(flagged, n, ranges, level=level)
    lo, hi = min(lo, estimate), max(hi, estimate)  # the point estimate (a mean over fold models) lies inside
    unlike = bool(distance > threshold)
    is_wide = bool(hi - lo > wide)
    reasons = []
    if unlike:
        reasons.append(f"the data looks unlike every source the guard learned from (distance {distance:.3f} > "
                       f"{threshold:.3f})")
    if is_wide:
        reasons.append(f"the estimate is uncertain ({level:.0%} interval {lo:.2f}-{hi:.2f})")
    return {"estimate": float(estimate), "interval": [round(lo, 4), round(hi, 4)], "level": level,
            "distance": round(float(distance), 4), "distance_threshold": round(float(threshold), 4),
            "unlike_training": unlike, "wide": is_wide,
            "advice": ("; ".join(reasons) + ": " + ADVICE) if reasons else None}


def guard_calibration(guard) -> dict | None:
    """The trust calibration a fitted `GuardScorer` was shipped with (guard v2's meta), for its kernel; None for
    a guard without one (guard v1)."""
    meta = getattr(guard, "meta_", {}) or {}
    block = (meta.get("kernel_model") or {}) if guard.kernel == "rbf" else meta
    return block.get("trust") if isinstance(block, dict) else None


def label_free_trust(detector, X, estimate=None, *, refusal=None) -> dict | None:
    """The trust block of a label-free run: `assess` of the detector's guard (the detector itself when it is a
    `GuardScorer`, else its `guard_`) on the sentence-view columns of X (the first columns, in every view the
    pipeline builds). `estimate`: the guard's `ContaminationEstimate` of X when the caller has it already (its
    fold models' decision values are the costly part, and its `flagged` share is what trust needs); `refusal`: the
    rows' refusal mask for an estimate made here (`GuardScorer.contamination_estimate`). None when
    the detector has no guard or its guard no calibration (guard v1)."""
    from .detectors.guard import GuardScorer

    guard = detector if isinstance(detector, GuardScorer) else getattr(detector, "guard_", None)
    if guard is None:
        return None
    cal = guard_calibration(guard)
    if cal is None:
        return None
    from .chunks import Columns, is_out_of_core

    # The sentence-view columns, read a chunk at a time when X is out of core (never copied whole)
    S = Columns(X, 0, len(guard.coef_)) if is_out_of_core(X) else np.asarray(X)[:, :len(guard.coef_)]
    if estimate is None or estimate.flagged is None:
        estimate = guard.contamination_estimate(S, refusal=refusal)
    # The reference set: the RBF model's support vectors (the rows nearest the decision boundary and the rest).
    reference = guard.model_["support_vectors"] if "support_vectors" in guard.model_ else None
    if reference is None:
        reference = guard._load_kernel_models(guard_file(guard), json_of(guard))[0]["support_vectors"]
    return assess(estimate.value, estimate.flagged, len(S), cal["ranges"], distance=pool_distance(S, reference),
                  threshold=cal["distance_threshold"], level=cal.get("level", LEVEL))


def guard_file(guard):
    from pathlib import Path

    from .detectors.guard import GUARD_FILE

    return Path(guard.weights) if guard.weights else GUARD_FILE


def json_of(guard) -> dict:
    import json

    return json.loads(guard_file(guard).read_text())
