"""Training the guard: the functions scripts/train_guard.py and the detection benchmark share.

A guard is an RBF support vector machine (and a logistic regression beside it) on the sentence-encoder view,
plus the fold models of its contamination estimate. Guard v2 (`fit_guard`) folds by source family
(`saft.pools.FAMILIES`): each fold model is trained without one family, so the rates its estimate assumes
(the share of harmful and of safe rows above its threshold) were measured on a family it never saw, which is a
user's situation, and the spread of those per-family rates is the width of the estimate's interval
(`saft.trust.estimate_interval`). Guard v3 is v2's models with a region-wise estimate (`saft.regions`,
`fold_region_rates`). Guard v1 (`choose_estimate_level`) folded by prompt within BeaverTails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from .detectors.guard import decision
from .regions import RegionModel, fit_regions, region_estimate, region_rates

logger = logging.getLogger(__name__)

LEVELS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # guard v1's
# Guard v2's: from the classifier's middle to its top, since a threshold high enough to keep every family's safe
# rows below it misses most harmful rows of an unseen family (the level is chosen by `choose_family_level`).
FAMILY_LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
RATES = (0.05, 0.1, 0.2, 0.3)
# Families a guard learns from in full rather than from their fixed `limit` subset: BeaverTails' safe and unsafe
# answers to the same risky questions are the hardest pairs to tell apart, and on held-out BeaverTails rows the
# guard trained on all its ~1660 training rows ranked better than on the 640 of the 800-row subset (AUROC 0.795
# against 0.768; the other families' held-out AUROC unchanged), so they are all used.
FULL_FAMILIES = ("beavertails",)


def train_limit(family: str, limit: int | None) -> int | None:
    """The `saft.pools.family_rows` limit of a family's guard rows (training and calibration): None (every row)
    for `FULL_FAMILIES`, else `limit`."""
    return None if family in FULL_FAMILIES else limit


def choose_estimate_level(cv: np.ndarray, y: np.ndarray, source: np.ndarray, *, reps: int = 100,
                          seed: int = 0) -> tuple[float, dict]:
    """Guard v1's level: the quantile of the harmful rows' scores at which the guard counts flagged rows.

    An adjusted count is unbiased only when the pool's safe rows look like the training safe rows; a user's
    are different, and the bias is (pool's false-positive rate - training's) / (tpr - fpr). A higher threshold
    shrinks both false-positive rates (less bias under shift) but counts fewer harmful rows (more variance).
    The trade-off is settled on simulated pools of 1000 rows built from cross-validated training scores only:
    harmful rows at 5-30%, safe rows drawn from all training safe rows, from BeaverTails safe answers only, or
    from the refusals only (the shifts), with tpr and fpr taken from the other half of the rows. The level with
    the smallest worst-shift RMSE wins. Returns (level, {level: worst RMSE}).
    """
    rng = np.random.default_rng(seed)
    harm, safe = cv[y == 1], cv[y == 0]
    shifts = {"all": safe, "bt_safe": cv[(y == 0) & (source == "bt_safe")], "refusals": cv[(y == 0) & (source != "bt_safe")]}
    worst = {}
    for level in LEVELS:
        rmse = []
        for pool_safe in shifts.values():
            err = []
            for _ in range(reps):
                h, s = rng.permutation(harm), rng.permutation(safe)
                ref_h, test_h, ref_s = h[: len(h) // 2], h[len(h) // 2:], s[: len(s) // 2]
                t = np.quantile(ref_h, level)
                tpr, fpr = (ref_h > t).mean(), (ref_s > t).mean()
                for rate in RATES:
                    n_h = int(rate * 1000)
                    z = np.concatenate([rng.choice(test_h, n_h), rng.choice(pool_safe, 1000 - n_h)])
                    err.append(np.clip(((z > t).mean() - fpr) / (tpr - fpr), 0, 1) - rate)
            rmse.append(float(np.sqrt(np.mean(np.square(err)))))
        worst[level] = round(max(rmse), 4)
    return min(worst, key=worst.get), worst


def rbf_arrays(svc) -> dict:
    """A fitted SVC as the arrays GuardScorer reads (support vectors as float16: unit-vector embeddings, so the
    rounding moves decision values by about 1e-3)."""
    return {"support_vectors": svc.support_vectors_.astype(np.float16), "dual_coef": svc.dual_coef_[0],
            "intercept": svc.intercept_[0], "gamma": svc._gamma}


def linear_arrays(lr) -> dict:
    return {"coef": lr.coef_[0].astype(np.float64), "intercept": float(lr.intercept_[0])}


def cap_rows(families: np.ndarray, y: np.ndarray, cap: int, *, seed: int = 0) -> np.ndarray:
    """Indices keeping at most `cap` rows of each family (a uniform draw, so a family keeps its class mix):
    no family outweighs the others in the classifier or in the estimate's pooled rates."""
    rng = np.random.default_rng(seed)
    keep = []
    for f in dict.fromkeys(families):
        idx = np.flatnonzero(families == f)
        keep.append(idx if len(idx) <= cap else np.sort(rng.choice(idx, cap, replace=False)))
    return np.sort(np.concatenate(keep))


def family_rates(cv: np.ndarray, y: np.ndarray, families: np.ndarray, threshold: float) -> dict:
    """Per family: the share of its safe rows (fpr) and harmful rows (tpr) whose family-held-out score is above
    `threshold`, with their counts (None where the family has no row of that class)."""
    out = {}
    for f in dict.fromkeys(families):
        m = families == f
        s, h = cv[m & (y == 0)], cv[m & (y == 1)]
        out[str(f)] = {"fpr": float((s > threshold).mean()) if len(s) else None,
                       "tpr": float((h > threshold).mean()) if len(h) else None,
                       "n_safe": int(len(s)), "n_harmful": int(len(h))}
    return out


def pooled_rates(rates: dict, skip: str | None = None) -> tuple[float, float]:
    """(tpr, fpr) the estimate assumes: each family's rate weighted equally (families, not rows, are the unit a
    new pool is drawn from), leaving out `skip` unless no other family has rows of that class."""
    def mean(key):
        vals = [r[key] for f, r in rates.items() if f != skip and r[key] is not None]
        return float(np.mean(vals or [r[key] for r in rates.values() if r[key] is not None]))

    return mean("tpr"), mean("fpr")


def choose_family_level(cv: np.ndarray, y: np.ndarray, families: np.ndarray, *, heldout=None, heldout_decisions=None,
                        levels=FAMILY_LEVELS, reps: int = 40, seed: int = 0, pool_size: int = 300) -> tuple[float, dict]:
    """Guard v2's level: the harmful-score quantile whose estimate errs least on the worst unseen family.

    The estimate is simulated as it is shipped, nested inside the training families: for each family g, the fold
    model trained without g counts simulated pools of `pool_size` rows at 0-30% harmful whose safe rows are g's
    (their family-held-out scores `cv`, i.e. that model's) and whose harmful rows are g's too when g has them,
    else the held-out harmful rows of the other families scored by that model (as a one-class family's pool
    takes donor rows); the count is adjusted with the rates that model's estimate would use: its rates on the
    held-out rows of the families it learned from (`heldout` = X, y, family, with `heldout_decisions` = each fold
    model's decision values on them, in the order of the families' first appearance), or without `heldout` the
    family-held-out rates of the families other than g. So both shifts weigh: safe rows that cross the threshold
    more often (a low threshold suffers) and harmful rows that cross it less often (a high one suffers). With
    `heldout`, each family's held-out rows also make pools counted by every fold model as shipped
    (`_seen_pool_rmse`): data like a family the guard learned from. The level with the smallest worst RMSE over
    all of those wins. (Adjusting with rates other than the ones the estimate
    uses chose a threshold that counted most of BeaverTails' safe answers as harmful with that family left out.)
    """
    rng = np.random.default_rng(seed)
    order = list(dict.fromkeys(families))
    worst = {}
    for level in levels:
        t = float(np.quantile(cv[y == 1], level))
        rates = family_rates(cv, y, families, t)
        if heldout is not None:
            _, yh, fh = heldout
            seen = [pooled_rates(family_rates(z[fh != g], yh[fh != g], fh[fh != g], t))
                    for g, z in zip(order, heldout_decisions)]
        rmse = []
        for i, g in enumerate(order):
            if rates[g]["fpr"] is None:
                continue
            tpr, fpr = seen[i] if heldout is not None else pooled_rates(rates, skip=g)
            if tpr - fpr <= 0:
                rmse.append(1.0)
                continue
            safe = cv[(families == g) & (y == 0)]
            harm = cv[(families == g) & (y == 1)]
            if not len(harm):
                harm = (heldout_decisions[i][(fh != g) & (yh == 1)] if heldout is not None
                        else cv[(families != g) & (y == 1)])
            err = []
            for _ in range(reps):
                for rate in (0.0,) + RATES:
                    n_h = int(round(rate * pool_size))
                    z = np.concatenate([rng.choice(harm, n_h), rng.choice(safe, pool_size - n_h)])
                    err.append(np.clip(((z > t).mean() - fpr) / (tpr - fpr), 0, 1) - rate)
            rmse.append(float(np.sqrt(np.mean(np.square(err)))))
        if heldout is not None:
            rmse += _seen_pool_rmse(heldout, heldout_decisions, seen, t, rng, reps=reps, pool_size=pool_size)
        worst[level] = round(max(rmse), 4)
    return min(worst, key=worst.get), worst


def _seen_pool_rmse(heldout, heldout_decisions, seen, t, rng, *, reps: int, pool_size: int) -> list[float]:
    """Per family: the RMSE of the shipped estimate (the median over every fold model, each with its seen rates)
    on simulated pools of that family's held-out rows (harmful rows from the other families' held-out rows when it
    has none), i.e. on data like a family the guard learned from. Rates pooled over families with equal weight
    undercount a family whose safe rows cross the threshold far more often than the others' (BeaverTails' safe
    answers to risky questions): a low threshold that suits unseen families overshoots on such a family."""
    _, yh, fh = heldout
    flagged = np.vstack(heldout_decisions) > t  # fold models x rows
    out = []
    for g in dict.fromkeys(fh):
        safe = np.flatnonzero((fh == g) & (yh == 0))
        harm = np.flatnonzero((fh == g) & (yh == 1))
        if not len(safe):
            continue
        if not len(harm):
            harm = np.flatnonzero((fh != g) & (yh == 1))
        err = []
        for _ in range(reps):
            for rate in (0.0,) + RATES:
                n_h = int(round(rate * pool_size))
                idx = np.concatenate([rng.choice(harm, n_h), rng.choice(safe, pool_size - n_h)])
                shares = flagged[:, idx].mean(axis=1)
                est = np.median([np.clip((q - fpr) / max(tpr - fpr, 1e-9), 0, 1) for q, (tpr, fpr) in zip(shares, seen)])
                err.append(est - n_h / pool_size)
        out.append(float(np.sqrt(np.mean(np.square(err)))))
    return out


@dataclass
class FittedGuard:
    """A guard trained by `fit_guard`: the final models, the fold models of the estimate and what calibrates it."""

    rbf: dict
    linear: dict
    folds: list[dict]  # RBF fold models, each with the shared "threshold", "tpr", "fpr"
    linear_folds: list[dict]
    fold_families: list[str]  # the family each fold model did not see
    level: float
    level_worst_rmse: dict
    rates: dict  # family -> rates of the family-held-out scores at the threshold (`family_rates`)
    linear_level: float
    linear_rates: dict
    cv: np.ndarray = field(repr=False)  # family-held-out RBF decision values of the training rows
    n_support: int = 0
    y: np.ndarray | None = field(default=None, repr=False)
    families: np.ndarray | None = field(default=None, repr=False)
    range_rates: dict = field(default_factory=dict)  # "<family> unseen" / "<family> seen" -> rates: the interval's
    linear_range_rates: dict = field(default_factory=dict)
    heldout: tuple | None = field(default=None, repr=False)
    regions: RegionModel | None = None  # with `heldout_refusal`: the region-wise estimate (`saft.regions`)
    region_rates: list[dict] = field(default_factory=list)  # per fold model: region -> [tpr, fpr]
    region_fallback: list[tuple[float, float]] = field(default_factory=list)  # per fold model: pooled (tpr, fpr)
    heldout_refusal: np.ndarray | None = field(default=None, repr=False)  # the held-out rows' refusal mask
    # the fold models' decision values on the held-out rows, which `estimates_by_level` rethresholds at every level
    _heldout_decisions: list | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def threshold(self) -> float:
        return self.folds[0]["threshold"]

    def score(self, X) -> np.ndarray:
        return decision(self.rbf, np.asarray(X, dtype=np.float64))

    def flagged_shares(self, X) -> np.ndarray:
        """Each fold model's share of X above the threshold."""
        X = np.asarray(X, dtype=np.float64)
        return np.array([float((decision(f, X) > f["threshold"]).mean()) for f in self.folds])

    def estimate(self, X, refusal=None, *, pooled: bool = False, with_se: bool = False):
        """The adjusted count, region-wise when the guard has regions (`refusal`: the pool's refusal mask,
        `saft.regions.refusal_mask`; `pooled`: the one-region count whatever the guard has), the median over
        the fold models; `with_se`: (that, the mean of their binomial standard errors), as
        `GuardScorer.contamination_estimate` reports them with guard v2's `estimate_combine` "median". The
        median, because a row far from every training row gets an RBF model's intercept as its score, and one
        fold model whose intercept is above the threshold flags a whole pool of such rows (measured with the
        mean: with the SBR family left out, every SBR pool at 0%, 10% and 30% harmful came out at exactly 0.200
        with AUROC 1.000, the mark of one fold in five at 1 and four near 0)."""
        X = np.asarray(X, dtype=np.float64)
        if self.regions is not None and not pooled:
            reg = self.regions.assign(X, refusal)
            parts = [(reg, rates, fb) for rates, fb in zip(self.region_rates, self.region_fallback)]
        else:  # one region with each fold model's own rates (the raw share where they cannot separate)
            parts = [(np.zeros(len(X), dtype=int), {}, (f["tpr"], f["fpr"])) for f in self.folds]
        est, se = zip(*(region_estimate(decision(f, X) > f["threshold"], reg, rates, fallback=fb, with_se=True)
                        for f, (reg, rates, fb) in zip(self.folds, parts)))
        value = float(np.median(est))
        return (value, float(np.mean(se))) if with_se else value

    def estimates_by_level(self, X, levels=FAMILY_LEVELS, *, refusal=None, pooled: bool = True) -> dict:
        """The same adjusted count at each level of `levels` (its threshold from the training rows'
        family-held-out scores): what a different level choice would have estimated. `pooled`: one pair of rates
        per fold model; else the region-wise count of a guard with regions, as `estimate` makes it (`refusal`:
        the pool's refusal mask), each level's region rates measured on the held-out rows as at the chosen level."""
        if not pooled and self.regions is None:
            raise ValueError("this guard has no regions, so it has no region-wise count: fit it with heldout and "
                             "heldout_refusal, or ask for pooled=True")
        X = np.asarray(X, dtype=np.float64)
        z = [decision(f, X) for f in self.folds]
        reg = None if pooled else self.regions.assign(X, refusal)
        if not pooled and self._heldout_decisions is None:
            self._heldout_decisions = [decision(f, self.heldout[0]) for f in self.folds]
        out = {}
        for level in levels:
            t = float(np.quantile(self.cv[self.y == 1], level))
            folds = [{**f, "threshold": t} for f in self.folds]
            if not pooled:
                rates, fallback = fold_region_rates(folds, self.regions, self.heldout, self.heldout_refusal,
                                                    decisions=self._heldout_decisions)
                est = [region_estimate(zz > t, reg, r, fallback=fb) for zz, r, fb in zip(z, rates, fallback)]
            else:
                rates = (seen_family_rates(folds, self.fold_families, self.heldout)[0] if self.heldout is not None
                         else [pooled_rates(family_rates(self.cv, self.y, self.families, t))] * len(folds))
                est = [np.clip(((zz > t).mean() - fpr) / max(tpr - fpr, 1e-9), 0, 1) for zz, (tpr, fpr) in zip(z, rates)]
            out[str(level)] = float(np.median(est))
        return out


def _fit_folds(model, X, y, families, order):
    cv = np.zeros(len(y))
    folds = []
    for f in order:
        held = families == f
        folds.append(clone(model).fit(X[~held], y[~held]))
        cv[held] = folds[-1].decision_function(X[held])
    return folds, cv


def _with_rates(arrays: list[dict], cv, y, families, level_fn, heldout=None) -> tuple[list[dict], float, dict, dict]:
    held_z = None if heldout is None else [decision(a, heldout[0]) for a in arrays]
    level, worst = level_fn(cv, y, families, heldout, held_z)
    t = float(np.quantile(cv[y == 1], level))
    rates = family_rates(cv, y, families, t)
    tpr, fpr = pooled_rates(rates)
    return [{**a, "threshold": t, "tpr": tpr, "fpr": fpr} for a in arrays], level, worst, rates


def seen_family_rates(folds: list[dict], fold_families: list[str], heldout) -> tuple[list[tuple[float, float]], dict]:
    """Each fold model's (tpr, fpr) on held-out rows of the families it did learn from (`heldout`: X, y, family of
    rows no model trained on), families weighted equally; and per family, its rates averaged over those folds."""
    Xh, yh, fh = heldout
    per_fold, per_family = [], {}
    for f, skip in zip(folds, fold_families):
        m = fh != skip
        rates = family_rates(decision(f, Xh[m]), yh[m], fh[m], f["threshold"])
        per_fold.append(pooled_rates(rates))
        for fam, r in rates.items():
            per_family.setdefault(fam, []).append(r)
    avg = {fam: {k: (float(np.mean([r[k] for r in rs])) if rs[0][k] is not None else None) for k in ("tpr", "fpr")}
           for fam, rs in per_family.items()}
    return per_fold, avg


def fold_region_rates(folds: list[dict], regions: RegionModel, heldout, refusal, *,
                      decisions=None) -> tuple[list[dict], list[tuple]]:
    """Each fold model's rates per region on the held-out rows (`heldout`: X, y, family; `refusal`: their refusal
    mask), the rows given their region by `regions` as a pool's rows are; and each fold model's pooled rates
    over those rows (families weighted equally), which stand in where a region has too few rows. Those pooled
    rates take every held-out family, the one the fold model never saw included, like the region rates beside
    them (so they are not quite the seen-family rates of `seen_family_rates` that guard v2's count assumes).
    `decisions`: each fold model's decision values on the held-out rows, where already computed."""
    Xh, yh, fh = heldout
    reg = regions.assign(Xh, refusal)
    rates, fallback = [], []
    for i, f in enumerate(folds):
        z = decision(f, Xh) if decisions is None else decisions[i]
        fb = pooled_rates(family_rates(z, yh, fh, f["threshold"]))
        rates.append(region_rates(z > f["threshold"], yh, reg, fallback=fb))
        fallback.append(fb)
    return rates, fallback


def fit_guard(X, y, families, *, heldout=None, heldout_refusal=None, C: float = 1.0, linear_C: float = 1.0,
              levels=FAMILY_LEVELS, seed: int = 0) -> FittedGuard:
    """Train guard v2 on rows X (sentence view), labels y (1 = harmful) and each row's source family.

    Final models: SVC(C, rbf, gamma 'scale', balanced) and LogisticRegression(linear_C, balanced) on every row.
    Fold models: one per family, trained without it (the leave-one-family-out folds). The estimate's threshold
    is the `choose_family_level` quantile of the family-held-out harmful scores, shared by the fold models.
    The rates each fold model's adjusted count assumes: with `heldout` (X, y, family of rows no model trains on,
    e.g. the families' `holdout_slice`), its rates on the held-out rows of the families it learned from (a pool
    like the training families, the common case); without, `pooled_rates` of the family-held-out rates. The
    interval's ranges (`range_rates`) span both: every family seen and unseen. With `heldout_refusal` (the
    held-out rows' refusal mask) the estimate is region-wise (`saft.regions`): a region model fitted on X and
    `families`, each fold model's rates per region measured on the held-out rows.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    families = np.asarray(families).astype(str)
    order = list(dict.fromkeys(families))
    if len(order) < 3:
        raise ValueError(f"a family-folded guard needs at least 3 families, got {order}")
    if not ((y == 1).any() and (y == 0).any()):
        raise ValueError("the guard's rows must hold both classes")
    if heldout is not None:
        heldout = (np.asarray(heldout[0], dtype=np.float64), np.asarray(heldout[1], dtype=int),
                   np.asarray(heldout[2]).astype(str))
    level_fn = lambda cv, yy, ff, hh, hz: choose_family_level(  # noqa: E731
        cv, yy, ff, heldout=hh, heldout_decisions=hz, levels=levels, seed=seed)
    svc = SVC(C=C, kernel="rbf", gamma="scale", class_weight="balanced")
    svc_folds, cv = _fit_folds(svc, X, y, families, order)
    arrays = [rbf_arrays(m) for m in svc_folds]
    for a in arrays:  # float16 support vectors, float64 decisions: as GuardScorer loads them
        a["support_vectors"] = a["support_vectors"].astype(np.float64)
    folds, level, worst, rates = _with_rates(arrays, cv, y, families, level_fn, heldout)
    lr = LogisticRegression(C=linear_C, class_weight="balanced", max_iter=5000)
    lr_folds, lr_cv = _fit_folds(lr, X, y, families, order)
    linear_folds, linear_level, _, linear_rates = _with_rates([linear_arrays(m) for m in lr_folds], lr_cv, y,
                                                              families, level_fn, heldout)
    svc.fit(X, y)
    lr.fit(X, y)
    range_rates = {f"{k} unseen": v for k, v in rates.items()}
    linear_range_rates = {f"{k} unseen": v for k, v in linear_rates.items()}
    if heldout is not None:
        for fl, rr in ((folds, range_rates), (linear_folds, linear_range_rates)):
            per_fold, seen = seen_family_rates(fl, order, heldout)
            for f, g, (tpr, fpr) in zip(fl, order, per_fold):
                f["tpr"], f["fpr"] = tpr, fpr
                # the rates each fold model's count assumes lie inside the interval's ranges too
                rr[f"without {g} assumed"] = {"tpr": tpr, "fpr": fpr}
            rr.update({f"{k} seen": v for k, v in seen.items()})
    final = rbf_arrays(svc)
    final["support_vectors"] = final["support_vectors"].astype(np.float64)
    regions, reg_rates, reg_fallback = None, [], []
    if heldout is not None and heldout_refusal is not None:
        regions = fit_regions(X, families)
        reg_rates, reg_fallback = fold_region_rates(folds, regions, heldout, heldout_refusal)
    return FittedGuard(rbf=final, linear=linear_arrays(lr), folds=folds, linear_folds=linear_folds,
                       fold_families=order, level=level, level_worst_rmse=worst, rates=rates,
                       linear_level=linear_level, linear_rates=linear_rates, cv=cv, n_support=int(len(svc.support_)),
                       y=y, families=families, range_rates=range_rates, linear_range_rates=linear_range_rates,
                       heldout=heldout, regions=regions, region_rates=reg_rates, region_fallback=reg_fallback,
                       heldout_refusal=None if regions is None else np.asarray(heldout_refusal, dtype=bool))


class RowViews:
    """The sentence view of labelled rows ({prompt, response} dicts), cached row by row under `cache_dir`.

    Guard training and the detection benchmark draw many overlapping row sets from the same families; a cache per
    row (named by a hash of the encoder version and the texts) computes each row once whatever set it comes in.
    `seed_from_shipped` fills it from the sentence view shipped with guard v1's rows (float16, as shipped).
    """

    def __init__(self, cache_dir, *, progress: bool = False):
        from pathlib import Path

        self.folder = Path(cache_dir) / "rowviews"
        self.progress = progress
        self.vectors: dict[str, np.ndarray] = {}
        if self.folder.is_dir():
            for path in sorted(self.folder.glob("chunk-*.npz")):
                with np.load(path) as z:
                    self.vectors.update(zip(z["keys"].tolist(), z["X"]))

    @staticmethod
    def key(prompt: str, response: str) -> str:
        import hashlib

        from .encoders import ENCODER_VERSION

        h = hashlib.sha256(ENCODER_VERSION.encode())
        h.update(prompt.encode("utf-8") + b"\0" + response.encode("utf-8"))
        return h.hexdigest()[:32]

    def _save(self, keys: list[str], X: np.ndarray) -> None:
        from .data import atomic_open

        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.folder / f"chunk-{len(list(self.folder.glob('chunk-*.npz'))):05d}-{keys[0][:8]}.npz", "wb") as f:
            np.savez(f, keys=np.array(keys), X=X.astype(np.float32))
        self.vectors.update(zip(keys, X.astype(np.float32)))

    def seed_from_shipped(self) -> int:
        """Add guard v1's shipped sentence view of its rows; returns how many rows were new."""
        from .reference import SHIPPED_FILE, reference_samples

        if not SHIPPED_FILE.exists():
            return 0
        samples = reference_samples()
        with np.load(SHIPPED_FILE) as z:
            X = z["sentence"].astype(np.float32)
        new = [(self.key(s.prompt, s.response), x) for s, x in zip(samples, X) if self.key(s.prompt, s.response) not in self.vectors]
        if new:
            self._save([k for k, _ in new], np.vstack([x for _, x in new]))
        return len(new)

    def __call__(self, rows, *, chunk: int = 200) -> np.ndarray:
        from .encoders import embed_pairs

        keys = [self.key(r["prompt"], r["response"]) for r in rows]
        missing = list(dict.fromkeys(i for i, k in enumerate(keys) if k not in self.vectors))
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            logger.info("embedding rows %d-%d of %d missing", start, start + len(part), len(missing))
            X = embed_pairs([rows[i]["prompt"] for i in part], [rows[i]["response"] for i in part], progress=self.progress)
            self._save([keys[i] for i in part], X)
        return np.vstack([self.vectors[k] for k in keys]).astype(np.float64) if keys else np.zeros((0, 768))


def save_guard(g: FittedGuard, json_path, npz_path, *, meta: dict, trust: dict) -> None:
    """Write a guard v2 as `GuardScorer` loads it: the logistic regression and its fold models in the JSON, the
    RBF model and its fold models (support vectors float16) in the .npz it names. `trust` (at least
    "distance_threshold") is completed with each kernel's interval calibration (`saft.trust.rate_ranges` of its
    family rates, the level) and stored in the meta, for `saft.trust.label_free_trust`."""
    from pathlib import Path

    from .data import atomic_open, write_json
    from .trust import LEVEL, rate_ranges

    json_path, npz_path = Path(json_path), Path(npz_path)
    common = {"level": LEVEL, "distance_reference": "the RBF model's support vectors",
              "distance_statistic": "median over the pool of each row's nearest-neighbour cosine distance", **trust}
    arrays = {}
    for i, f in enumerate(g.folds):
        arrays.update({f"fold{i}_{k}": (np.asarray(v, dtype=np.float16) if k == "support_vectors" else v)
                       for k, v in f.items()})
    final = {k: (np.asarray(v, dtype=np.float16) if k == "support_vectors" else v) for k, v in g.rbf.items()}
    with atomic_open(npz_path, "wb") as fh:
        np.savez_compressed(fh, **final, n_folds=len(g.folds), **arrays)
    meta = {**meta, "estimate_combine": "median", "estimate_level": g.linear_level, "family_rates": g.linear_rates, "fold_families": g.fold_families,
            "trust": {**common, "ranges": rate_ranges(g.linear_range_rates or g.linear_rates),
                      "family_rates": g.linear_range_rates or g.linear_rates}}
    meta["kernel_model"] = {**meta.get("kernel_model", {}), "gamma": float(g.rbf["gamma"]), "n_support": g.n_support,
                            "estimate_level": g.level,
                            "estimate_level_worst_rmse": {str(k): v for k, v in g.level_worst_rmse.items()},
                            "trust": {**common, "ranges": rate_ranges(g.range_rates or g.rates),
                                      "family_rates": g.range_rates or g.rates}}
    folds = [{"coef": np.asarray(f["coef"]).tolist(), "intercept": float(f["intercept"]), "threshold": f["threshold"],
              "tpr": f["tpr"], "fpr": f["fpr"]} for f in g.linear_folds]
    write_json({"coef": np.asarray(g.linear["coef"]).tolist(), "intercept": float(g.linear["intercept"]),
                "estimate_folds": folds, "kernel_model": npz_path.name, "meta": meta}, json_path)


def save_region_guard(base_json, out_json, X, families, heldout, heldout_refusal, *, meta: dict) -> RegionModel:
    """Write a guard v3: the guard at `base_json` (a v2 file) with the region-wise estimate (`saft.regions`).

    The region model is fitted on the base guard's training rows (`X`, `families`); each fold model's rates per
    region are measured on `heldout` (X, y, family of rows no model trained on, with `heldout_refusal`, their
    refusal mask) for both kernels. The new JSON names the base's RBF file, so it is written beside it; `meta`
    is added to the base's meta.
    """
    import json
    from pathlib import Path

    from .data import write_json
    from .detectors.guard import GuardScorer
    from .regions import MIN_ROWS

    base_json, out_json = Path(base_json), Path(out_json)
    if base_json.resolve().parent != out_json.resolve().parent:
        raise ValueError(f"{out_json} must be written beside {base_json}: it names that guard's RBF file")
    base = json.loads(base_json.read_text())
    regions = fit_regions(X, families)
    blocks = {}
    for kernel in ("linear", "rbf"):
        folds = GuardScorer(weights=str(base_json), kernel=kernel).load_weights().estimate_models_
        rates, fallback = fold_region_rates(folds, regions, heldout, heldout_refusal)
        blocks[kernel] = {"fold_rates": rates, "fold_fallback": [list(fb) for fb in fallback], "min_rows": MIN_ROWS}
    m = base["meta"]
    m = {**m, **meta, "based_on": base_json.name, "region_model": regions.to_json(), "regions": blocks["linear"],
         "kernel_model": {**m.get("kernel_model", {}), "regions": blocks["rbf"]}}
    write_json({**base, "meta": m}, out_json)
    return regions
