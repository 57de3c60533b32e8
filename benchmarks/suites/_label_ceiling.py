"""Other ways to spend 30 labels on a pool, tried to measure the ceiling of the labels_30 target (benchmark-only).

A way is a design (which rows get labelled) and an estimator (how the removed count is read from their labels):
- designs: `chosen` (`saft label`'s rows: saft.label.choose_rows with the guard's estimate, as shipped), `even`
  (choose_rows without an estimate: 30 equal rank strata over the pool), `two-phase` (15 chosen rows, then 15
  spread over the ranks where a Platt fit on the first 15 is unsure, 0.1 <= p <= 0.9, widened around p = 0.5 when
  that holds too few rows);
- estimators: `calibrated` (the shipped rule: Platt with the guard's estimate as a prior worth PRIOR_WEIGHT
  labels), `platt` (the same rule without the prior), `isotonic` (the summed probabilities of an isotonic fit),
  `rank-nn` (each labelled row stands for the rows nearest it by rank).
The best of these on a family is the measured ceiling the shipped way is read against.
"""

from __future__ import annotations

import numpy as np

DESIGNS = ("chosen", "even", "two-phase")
ESTIMATORS = ("calibrated", "platt", "isotonic", "rank-nn")
N_LABELS = 30


def _count(estimator: str, z: np.ndarray, idx: np.ndarray, y: np.ndarray, prior: float) -> int:
    """The removed count `estimator` reads from the labels y[idx]; ValueError when they hold one class only."""
    from sklearn.isotonic import IsotonicRegression

    from saft.select import PRIOR_WEIGHT, select_calibrated

    if estimator in ("calibrated", "platt"):
        kw = {"prior": prior, "prior_weight": PRIOR_WEIGHT} if estimator == "calibrated" else {}
        return select_calibrated(z, z[idx], y[idx], margin=0.0, **kw).n_removed  # the estimated count
    if len(set(y[idx].tolist())) < 2:
        raise ValueError("labels of one class only")
    if estimator == "isotonic":
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(z[idx], y[idx])
        return int(round(iso.predict(z).sum()))
    rank = np.empty(len(z), dtype=int)
    rank[np.argsort(z, kind="stable")] = np.arange(len(z))
    by_rank = np.argsort(rank[idx])
    lr, lab = rank[idx][by_rank], y[idx][by_rank]
    cuts = np.concatenate([[0], (lr[:-1] + lr[1:] + 1) // 2, [len(z)]])  # halfway between labelled ranks
    return int(np.sum(np.diff(cuts) * lab))


def _two_phase(z: np.ndarray, y: np.ndarray, estimate: float, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    from saft.label import choose_rows

    half = N_LABELS // 2
    first = choose_rows(z, n=half, estimate=estimate, seed=seed)
    rest = N_LABELS - half
    taken = set(first.tolist())
    order = np.argsort(z, kind="stable")
    free = [r for r in range(len(z)) if order[r] not in taken]
    if len(set(y[first].tolist())) < 2:  # nothing to fit: the second half spread over the other ranks
        unsure = free
    else:
        p = LogisticRegression(C=100.0).fit(z[first].reshape(-1, 1), y[first]).predict_proba(
            z[order].reshape(-1, 1))[:, 1]
        unsure = [r for r in free if 0.1 <= p[r] <= 0.9]
        if len(unsure) < rest:
            mid = int(np.argmin(np.abs(p - 0.5)))
            unsure = sorted(sorted(free, key=lambda r: abs(r - mid))[: 2 * rest])
    rng = np.random.default_rng(seed + 7)
    edges = np.linspace(0, len(unsure), rest + 1).astype(int)
    second = [order[unsure[rng.integers(a, b)]] for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return np.concatenate([first, np.asarray(second, dtype=int)])


def _pick(design: str, z: np.ndarray, y: np.ndarray, estimate: float, seed: int) -> np.ndarray:
    from saft.label import choose_rows

    if design == "two-phase":
        return _two_phase(z, y, estimate, seed)
    return choose_rows(z, n=N_LABELS, estimate=estimate if design == "chosen" else None, seed=seed)


def ceiling_errors(scores, labels, estimate: float, *, draws: int, seed: int) -> dict[str, float | None]:
    """Per way ("design / estimator"): the removal-count error |count - harmful| / rows, mean over the `draws`
    label draws that did not refuse (None when every draw did)."""
    z, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    out = {}
    for design in DESIGNS:
        picks = [_pick(design, z, y, estimate, seed + d) for d in range(draws)]
        for est in ESTIMATORS:
            errs = []
            for idx in picks:
                try:
                    errs.append(abs(_count(est, z, idx, y, estimate) - y.sum()) / len(y))
                except ValueError:  # labels of one class: the rule refuses
                    pass
            out[f"{design} / {est}"] = float(np.mean(errs)) if errs else None
    return out


def best_worst(pools: list[dict[str, float | None]]) -> tuple[str, float] | None:
    """The way whose worst pool error is lowest, over ways measured on every pool, and that error."""
    if not pools:
        return None
    worst = {w: max(p[w] for p in pools) for w in pools[0] if all(p.get(w) is not None for p in pools)}
    return min(worst.items(), key=lambda kv: kv[1]) if worst else None
