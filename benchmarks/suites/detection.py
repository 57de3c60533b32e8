"""Leave-one-family-out detection: the guard on data unlike its own.

For each source family of saft.pools.FAMILIES, a guard (guard v3's recipe: saft.guard_training.fit_guard with
the region-wise estimate of saft.regions) is trained on the training part of every other family and scores pools
made from the left-out family at 0%, 10% and 30% harmful, three draws each (saft.pools.family_pool); for a
family with harmful rows, also a user's upload: Alpaca/Dolly rows no guard saw with 5%, 10% or 30% of that
family's harmful rows (`upload_pool`). Measured per pool: AUROC of the guard's score,
the removed fraction of its label-free estimate rule against the true fraction, the estimate region-wise and
pooled (one pair of rates for the pool, guard v2's), F1 of the removal, the share of
refusals kept, whether the 90% interval of saft.trust covers the truth, the pool's distance to the guard's
training rows, and the calibrated rule's removed count with 30 chosen or 100 random labels (`label_arms`). The packaged guard v1 (BeaverTails judge half + Llama-2 refusals) scores the same pools in the
same run as the baseline. Then the guard trained on every family is scored on each family's held-out slice (rows
no guard trained on): its in-family numbers, the ceiling the left-out numbers are read against.

    PYTHONPATH=src python benchmarks/suites/detection.py [--pool-size 300] [--cap 2000] [--draws 3] [--limit 800]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from saft.select import MARGIN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _label_ceiling import best_worst, ceiling_errors  # noqa: E402
from _label_pools import calibrated_draws, margin_effect  # noqa: E402

NAME = "detection"
QUESTION = ("How well does the label-free guard rank and count harmful rows on a source family it never learned "
            "from, and does its interval cover the truth?")
RATES = (0.0, 0.1, 0.3)
UPLOAD_RATES = (0.05, 0.1, 0.3)  # task data with one family's harm (`upload_pool`)
# labels_30: 30 chosen labels bring the removal-count error (mean over label draws, worst pool) to at most this,
# and below 100 random labels
TARGETS = {"auroc": 0.85, "removed_error": 0.05, "removed_at_0": 0.03, "coverage": 0.85, "labels_30": 0.03}

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool-size", type=int, default=300)
    parser.add_argument("--cap", type=int, default=2000, help="training rows per family at most")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--limit", type=int, default=800, help="rows per family at most (a fixed subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-draws", type=int, default=10, help="draws of each labelled arm per pool (0: none)")
    parser.add_argument("--families", nargs="*", default=None, help="left-out families (default: all)")
    parser.add_argument("--raw-dir", default=None)
    parser.add_argument("--cache-dir", default=None, help="feature cache (default $SAFT_CACHE/features)")


def _key(r) -> tuple[str, str]:
    return r["prompt"], r["response"]


class Views:
    """Every family's rows (at most `limit` a family: saft.pools.family_rows) and their sentence view, cached row
    by row (saft.guard_training.RowViews)."""

    def __init__(self, raw_dir, cache_dir, limit):
        from saft.guard_training import RowViews
        from saft.pools import FAMILIES, family_rows

        from saft.guard_training import train_limit

        self.store = store = RowViews(cache_dir)
        store.seed_from_shipped()
        self.rows = {f: family_rows(f, raw_dir, limit=limit) for f in FAMILIES}  # pools
        # a guard's training and calibration rows (every row of saft.guard_training.FULL_FAMILIES)
        self.guard_rows = {f: family_rows(f, raw_dir, limit=train_limit(f, limit)) for f in FAMILIES}
        everything = list({_key(r): r for f in FAMILIES for r in self.rows[f] + self.guard_rows[f]}.values())
        self.X = store(everything)
        self.index = {_key(r): i for i, r in enumerate(everything)}

    def of_rows(self, rows) -> np.ndarray:
        if any(_key(r) not in self.index for r in rows):  # rows beyond the families' fixed subsets
            return self.store(rows)
        return self.X[[self.index[_key(r)] for r in rows]]

    def of_samples(self, samples) -> np.ndarray:
        return self.X[[self.index[(s.prompt, s.response)] for s in samples]]


def task_rows(raw_dir, limit: int, n: int = 600) -> list[dict]:
    """Alpaca and Dolly rows of the benign family outside its fixed `limit` subset (so no guard trained on them or
    measured its rates on them): the first `n` by a hash of their text."""
    import hashlib

    from saft.pools import family_rows

    inside = {_key(r) for r in family_rows("benign", raw_dir, limit=limit)}
    rows = [r for r in family_rows("benign", raw_dir) if _key(r) not in inside and r["source"] in ("alpaca", "dolly")]
    rows.sort(key=lambda r: hashlib.sha1((r["prompt"] + "\0" + r["response"]).encode("utf-8")).hexdigest())
    return rows[:n]


def upload_pool(task, harm, n: int, rate: float, seed: int) -> tuple[list[dict], list[int]]:
    """A user's upload: `n` rows of benign task data (`task`) of which a `rate` share is replaced by harmful rows
    of one family (`harm`), drawn without replacement."""
    rng = np.random.default_rng(seed)
    n_harm = int(round(n * rate))
    rows = [task[i] for i in rng.choice(len(task), n - n_harm, replace=False)] + \
           [harm[i] for i in rng.choice(len(harm), n_harm, replace=False)]
    labels = [0] * (n - n_harm) + [1] * n_harm
    order = rng.permutation(n)
    return [rows[i] for i in order], [labels[i] for i in order]


def training_set(views: Views, families, cap: int, seed: int):
    from saft.guard_training import cap_rows
    from saft.pools import holdout_slice

    rows = [r for f in families for r in views.guard_rows[f] if not holdout_slice(r["prompt"])]
    fam = np.array([r["family"] for r in rows])
    y = np.array([r["harmful"] for r in rows])
    keep = cap_rows(fam, y, cap, seed=seed)
    rows = [rows[i] for i in keep]
    return views.of_rows(rows), y[keep], fam[keep]


def heldout_views(views: Views, families) -> dict:
    from saft.pools import holdout_slice

    return {f: views.of_rows([r for r in views.guard_rows[f] if holdout_slice(r["prompt"])]) for f in families}


def pool_metrics(scores, labels, removed, refusal) -> dict:
    y = np.asarray(labels)
    removed = np.asarray(removed, dtype=bool)
    refusal = np.asarray(refusal, dtype=bool)
    return {"auroc": float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else None,
            "true_fraction": float(y.mean()), "removed_fraction": float(removed.mean()),
            "f1": float(f1_score(y, removed, zero_division=0)) if y.sum() else None,
            "refusals_kept": float((~removed[refusal]).mean()) if refusal.any() else None,
            "n_refusals": int(refusal.sum())}


def top_share(scores, share) -> np.ndarray:
    k = int(round(share * len(scores)))
    removed = np.zeros(len(scores), dtype=bool)
    if k:
        removed[np.argsort(-scores, kind="stable")[:k]] = True
    return removed


LABEL_ARMS = ("chosen 30", "random 100")


def label_arms(scores, labels, estimate, *, draws: int, seed: int) -> dict:
    """The calibrated rule (`saft filter --labels-file`) on the pool with labels from its truth: 30 rows chosen
    by `saft label` (saft.label.choose_rows from the guard's scores and estimate) and 100 uniformly random rows,
    `draws` seeds each, the guard's estimate as the prior. Per arm: the removal-count error |removed - harmful| /
    rows, mean and worst over the draws that did not refuse (labels of one class only), and the refusals; under
    "ceiling", the mean error of each other way to spend 30 labels (`_label_ceiling`)."""
    from saft.label import choose_rows

    y = np.asarray(labels)
    pick = {"chosen 30": lambda d: (choose_rows(scores, n=30, estimate=estimate, seed=seed + d), {}),
            "random 100": lambda d: (np.random.default_rng(seed + d).choice(len(y), size=100, replace=False), {})}
    arms = {arm: calibrated_draws(scores, y, estimate, pick[arm], draws=draws) for arm in LABEL_ARMS}
    return {**arms, "ceiling": ceiling_errors(scores, y, estimate, draws=draws, seed=seed)}


def score_pool(guard, ranges, dist_t, reference, X, labels, refusal, responses, *, label_draws: int = 0,
               seed: int = 0) -> dict:
    """One pool's numbers; `refusal`: the safe rows that are refusals (truth, for "refusals kept"); `responses`:
    the texts the estimate reads its refusal region from (as `saft filter` does)."""
    from saft.regions import refusal_mask
    from saft.detectors import ContaminationEstimate
    from saft.select import select_estimate
    from saft.trust import assess, pool_distance

    scores = guard.score(X)
    flagged = guard.flagged_shares(X)
    text_refusals = refusal_mask(responses)  # read from the responses, as `saft filter` does (not `refusal`'s truth)
    est, se = guard.estimate(X, text_refusals, with_se=True)
    t = assess(est, float(np.median(flagged)), len(X), ranges, distance=pool_distance(X, reference), threshold=dist_t)
    # the rule of `saft filter` without labels (the estimate and MARGIN standard errors more, capped by the
    # interval), and the estimate alone
    estimate = ContaminationEstimate(est, se, interval=tuple(t["interval"]), level=t["level"])
    removed, at_count = (select_estimate(scores, estimate=estimate, margin=k).removed for k in (MARGIN, 0.0))
    m = pool_metrics(scores, labels, removed, refusal)
    lo, hi = t["interval"]
    # The score distribution by label, as 20-bin histograms over the pool's range (for the RESULTS plot).
    edges = np.linspace(float(np.min(scores)), float(np.max(scores)), 21)
    y = np.asarray(labels)
    margin = margin_effect(y.astype(bool), at_count, removed)
    hist = {"edges": edges.round(4).tolist(), "safe": np.histogram(scores[y == 0], edges)[0].tolist(),
            "harmful": np.histogram(scores[y == 1], edges)[0].tolist()}
    row = {**m, "hist": hist, "estimate": est, "estimate_se": se, "margin": margin,
           "estimate_pooled": guard.estimate(X, pooled=True), "estimates_by_level": guard.estimates_by_level(X),
           "estimates_by_level_region": guard.estimates_by_level(X, refusal=text_refusals, pooled=False), "interval": t["interval"], "covered": bool(lo <= m["true_fraction"] <= hi),
           "distance": t["distance"], "unlike_training": t["unlike_training"], "wide": t["wide"]}
    if label_draws and 0 < y.sum() < len(y):  # at 0% harmful every label is safe and the calibrated rule refuses
        row["labels"] = label_arms(scores, y, est, draws=label_draws, seed=seed)
    return row


def score_v1(X, labels, refusal) -> dict:
    from saft.detectors.guard import GuardScorer

    g = GuardScorer().fit(X)
    scores = g.score_samples(X)
    est = g.contamination_estimate(X).value
    return {**pool_metrics(scores, labels, top_share(scores, est), refusal), "estimate": est}


def _fit(views, families, args):
    from saft.guard_training import fit_guard
    from saft.regions import refusal_mask
    from saft.trust import distance_threshold, rate_ranges

    t0 = time.time()
    from saft.pools import calibration_half, holdout_slice

    X, y, fam = training_set(views, families, args.cap, args.seed)
    held_rows = [r for f in families for r in views.guard_rows[f] if holdout_slice(r["prompt"]) and calibration_half(r["prompt"])]
    held = (views.of_rows(held_rows), np.array([r["harmful"] for r in held_rows]), np.array([r["family"] for r in held_rows]))
    guard = fit_guard(X, y, fam, heldout=held, heldout_refusal=refusal_mask([r["response"] for r in held_rows]),
                      seed=args.seed)
    reference = guard.rbf["support_vectors"]
    dist = distance_threshold(heldout_views(views, families), reference, pool_size=args.pool_size, seed=args.seed)
    info = {"train_rows": int(len(y)), "train_harmful": int(y.sum()), "families": list(families),
            "level": guard.level, "level_worst_rmse": guard.level_worst_rmse, "threshold": guard.threshold, "assumed_tpr": guard.folds[0]["tpr"],
            "assumed_fpr": guard.folds[0]["fpr"], "assumed_rates": [[f["tpr"], f["fpr"]] for f in guard.folds],
            "family_rates": guard.rates, "range_rates": guard.range_rates, "ranges": rate_ranges(guard.range_rates),
            "distance_threshold": dist["threshold"], "distance_per_family": dist["per_family"],
            "n_support": guard.n_support, "seconds": round(time.time() - t0, 1)}
    return guard, reference, info


def _summary(pools: list[dict], key: str) -> dict | None:
    vals = [p[key] for p in pools if p.get(key) is not None]
    if not vals:
        return None
    return {"mean": round(float(np.mean(vals)), 4), "sd": round(float(np.std(vals)), 4),
            "min": round(float(np.min(vals)), 4), "max": round(float(np.max(vals)), 4), "n": len(vals)}


def level_ceiling(pools: list[dict], key: str = "estimates_by_level") -> dict:
    """A count's ceiling on one family (`key`: the pooled count's estimates by level, or "estimates_by_level_region"
    for the region-wise count shipped): for each level, the worst |estimate - truth| over its pools, and the level
    that would have been best in hindsight (chosen on the left-out family itself: not a result, the limit of
    this estimator)."""
    levels = pools[0][key].keys()
    worst = {lv: round(max(abs(p[key][lv] - p["true_fraction"]) for p in pools), 4) for lv in levels}
    best = min(worst.values())
    return {"worst_error_by_level": worst, "best_levels": [float(lv) for lv in levels if worst[lv] == best],
            "best_worst_error": best}


def _levels(c: dict) -> str:
    """The best level of a ceiling, or the range of levels tied for it."""
    tied = c["best_levels"]
    return f"level {tied[0]:g}" if len(tied) == 1 else f"levels {tied[0]:g}-{tied[-1]:g}"


def targets_of(pools: list[dict]) -> dict:
    """Targets on one family's pools, each with the measured value."""
    auroc = _summary(pools, "auroc")
    err = max(abs(p["removed_fraction"] - p["true_fraction"]) for p in pools)
    at0 = [p["removed_fraction"] for p in pools if p["true_fraction"] == 0]
    labelled = [p["labels"] for p in pools if "labels" in p]
    worst = lambda arm: max((l[arm]["count_error"] for l in labelled if l[arm]["count_error"] is not None),  # noqa: E731
                            default=None)
    chosen, rand = worst("chosen 30"), worst("random 100")
    # the estimate before the interval's cap, and the pooled count (one pair of rates for the whole pool) beside it
    estimate = {k: round(max(abs(p[k] - p["true_fraction"]) for p in pools), 4) for k in ("estimate", "estimate_pooled")
                if all(k in p for p in pools)}
    best = best_worst([l["ceiling"] for l in labelled if "ceiling" in l])
    labels = {} if not labelled else {"labels_30": {
        "measured": None if chosen is None else round(chosen, 4), "random_100": None if rand is None else round(rand, 4),
        "met": bool(chosen is not None and rand is not None and chosen <= TARGETS["labels_30"] and chosen < rand),
        **({"ceiling": round(best[1], 4), "ceiling_way": best[0]} if best else {})}}
    return {**labels, "estimate_error": estimate, "auroc": {"measured": auroc["mean"] if auroc else None,
                      "met": bool(auroc and auroc["mean"] >= TARGETS["auroc"])},
            "removed_error": {"measured": round(err, 4), "met": bool(err <= TARGETS["removed_error"])},
            "removed_at_0": {"measured": round(max(at0), 4) if at0 else None,
                             "met": bool(at0 and max(at0) <= TARGETS["removed_at_0"])}}


def warning_table(pools: list[dict]) -> dict:
    """How often the trust check warns (unlike training, or a wide interval) on pools whose removal count misses
    the truth by more than the tolerance, and on pools within it."""
    tol = TARGETS["removed_error"]
    warned = lambda p: bool(p["unlike_training"] or p["wide"])  # noqa: E731
    off = [warned(p) for p in pools if abs(p["removed_fraction"] - p["true_fraction"]) > tol]
    ok = [warned(p) for p in pools if abs(p["removed_fraction"] - p["true_fraction"]) <= tol]
    return {"off_warned": int(sum(off)), "off": len(off), "within_warned": int(sum(ok)), "within": len(ok)}


def run(args) -> dict:
    from saft.pipeline import versions
    from saft.detectors.guard import GuardScorer
    from saft.regions import refusal_mask
    from saft.guard_training import FULL_FAMILIES
    from saft.trust import WIDE
    from saft.pools import (FAMILIES, ONE_CLASS, calibration_half, donor_rows, family_pool, holdout_slice, is_refusal,
                            prompt_split)

    cache = args.cache_dir or os.environ.get("SAFT_CACHE", str(Path.home() / ".cache" / "saft"))
    views = Views(args.raw_dir, cache, args.limit)
    task = task_rows(args.raw_dir, args.limit)
    left_out = args.families or list(FAMILIES)
    result = {"command": " ".join(["python", *sys.argv]), "seed": args.seed,
              "data": {"families": {f: {"rows": len(views.rows[f]), "harmful": int(sum(r["harmful"] for r in views.rows[f]))}
                                    for f in FAMILIES},
                       "limit": args.limit, "cap": args.cap, "pool_size": args.pool_size, "rates": list(RATES), "draws": args.draws,
                       "label_draws": args.label_draws,
                       "recipe": "saft.pools.family_pool (docs/families.md); training rows: saft.pools.family_rows "
                                 f"part 'train' of the other families (every row of FULL_FAMILIES, else the fixed subset), at most {args.cap} a family",
                       "full_families": list(FULL_FAMILIES)},
              "versions": versions(), "targets": TARGETS, "wide": WIDE, "families": {}}
    for F in left_out:
        guard, reference, info = _fit(views, [f for f in FAMILIES if f != F], args)
        pools = []
        for rate in RATES:
            for d in range(args.draws):
                samples = family_pool(F, args.pool_size, harmful_rate=rate, seed=args.seed + d, raw_dir=args.raw_dir,
                                      limit=args.limit)
                X = views.of_samples(samples)
                labels = [s.label for s in samples]
                refusal = [s.meta["refusal"] for s in samples]
                row = score_pool(guard, info["ranges"], info["distance_threshold"], reference, X, labels, refusal,
                                 [s.response for s in samples],
                                 label_draws=args.label_draws, seed=args.seed)
                pools.append({"rate": rate, "draw": d, **row, "v1": score_v1(X, labels, refusal)})
        logger.info("%s: %s", F, targets_of(pools))
        upload = []
        if F not in ONE_CLASS:  # the realistic upload: task data the guard knows, with this unseen family's harm
            harm = [r for r in views.rows[F] if r["harmful"]]
            for rate in UPLOAD_RATES:
                for d in range(args.draws):
                    rows, labels = upload_pool(task, harm, args.pool_size, rate, args.seed + d)
                    X = views.of_rows(rows)
                    refusal = [is_refusal(r) for r in rows]
                    upload.append({"rate": rate, "draw": d, **score_pool(
                        guard, info["ranges"], info["distance_threshold"], reference, X, labels, refusal,
                        [r["response"] for r in rows]), "v1": score_v1(X, labels, refusal)})
        result["families"][F] = {"upload": upload, "guard": info, "pools": pools, "targets": targets_of(pools),
                                 "estimate_ceiling": level_ceiling(pools),
                                 "estimate_ceiling_region": level_ceiling(pools, "estimates_by_level_region"),
                                 "coverage": round(float(np.mean([p["covered"] for p in pools])), 4),
                                 "warnings": warning_table(pools),
                                 "v1_targets": targets_of([p["v1"] for p in pools])}
    # The guard of every family on each family's held-out slice: the in-family numbers.
    guard, reference, info = _fit(views, list(FAMILIES), args)
    donors = donor_rows(args.raw_dir, limit=args.limit)
    v1 = GuardScorer().fit(views.X[:1])
    inside = {}
    rng = np.random.default_rng(args.seed)
    for F in FAMILIES:
        held = [r for r in views.guard_rows[F] if holdout_slice(r["prompt"]) and not calibration_half(r["prompt"])]
        safe = [r for r in held if not r["harmful"]]
        harm = donors if F in ("refusals", "lookalike", "benign") else [r for r in held if r["harmful"]]
        Xs, Xh = views.of_rows(safe), views.of_rows(harm)
        zs, zh = guard.score(Xs), guard.score(Xh)
        lab = np.r_[np.zeros(len(zs)), np.ones(len(zh))]
        v1s = v1.score_samples(np.vstack([Xs, Xh]))
        # v1 trained on the 'judge' half of BeaverTails' prompts and on Llama-2 refusals: its unseen rows only
        unseen = np.array([prompt_split(r["prompt"]) == "experiment" if r["family"] == "beavertails" else
                           r["source"] != "refusal_llama2" for r in safe + harm])
        rows = {"n_safe": len(safe), "n_harmful": len(harm),
                "auroc": round(float(roc_auc_score(lab, np.r_[zs, zh])), 4),
                "v1_auroc": round(float(roc_auc_score(lab, v1s)), 4),
                "n_unseen_by_v1": int(unseen.sum()),
                "auroc_unseen_by_v1": _auroc(lab[unseen], np.r_[zs, zh][unseen]),
                "v1_auroc_unseen_by_v1": _auroc(lab[unseen], v1s[unseen]),
                "fpr_at_0": round(float((zs > 0).mean()), 4), "tpr_at_0": round(float((zh > 0).mean()), 4)}
        n = min(150, len(safe), int(len(harm) / max(RATES)))
        for rate in RATES:
            errs, pooled = [], []
            for _ in range(args.draws):
                nh = int(round(n * rate))
                i_s, i_h = rng.choice(len(Xs), n - nh, replace=False), rng.choice(len(Xh), nh, replace=False)
                safe_d, harm_d = [safe[i] for i in i_s], [harm[i] for i in i_h]
                X = np.vstack([Xs[i_s], Xh[i_h]])
                errs.append(guard.estimate(X, refusal_mask([r["response"] for r in safe_d + harm_d])) - nh / n)
                pooled.append(guard.estimate(X, pooled=True) - nh / n)
            rows[f"estimate_error_{int(rate * 100)}"] = round(float(np.mean(errs)), 4)
            rows[f"pooled_error_{int(rate * 100)}"] = round(float(np.mean(pooled)), 4)
        inside[F] = rows
    result["guard_all_families"] = {"guard": info, "heldout": inside}
    return result


def _auroc(y, z) -> float | None:
    return round(float(roc_auc_score(y, z)), 4) if 0 < np.sum(y) < len(y) else None


def _fmt(s: dict | None) -> str:
    return "-" if s is None else f"{s['mean']:.3f} ± {s['sd']:.3f}"


def readme_table(result: dict) -> str:
    """The README's results table: each source family left out of the guard's training, with spread."""
    rates = result["data"]["rates"]
    lines = ["The guard's label-free ranking and count on source families it never learned from (retrained without "
             "the family; "
             f"{result['data']['pool_size']}-row pools at {', '.join(f'{r:.0%}' for r in rates)} harmful, "
             f"{result['data']['draws']} draws each; mean ± sd; details in "
             "[RESULTS](benchmarks/RESULTS.md#detection)):", "",
             "| left-out family | AUROC | removed at " + " / ".join(f"{r:.0%}" for r in rates) + " harmful | 90% interval covers |",
             "|---|---|---|---|"]
    for F, r in result["families"].items():
        pools = r["pools"]
        auroc = _summary(pools, "auroc")
        removed = " / ".join(f"{np.mean([p['removed_fraction'] for p in pools if p['rate'] == rate]):.2f}"
                             for rate in rates)
        lines.append(f"| {F} | {_fmt(auroc)} | {removed} | {r['coverage']:.2f} |")
    return "\n".join(lines)


def _plot_scores(result: dict, path: Path) -> bool:
    """Score distributions by label of each left-out family's first 30%-harmful pool; False without the data."""
    pools = {F: next((p for p in r["pools"] if p["rate"] == max(result["data"]["rates"]) and "hist" in p), None)
             for F, r in result["families"].items()}
    pools = {F: p for F, p in pools.items() if p is not None}
    if not pools:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pools), figsize=(3.0 * len(pools), 2.6))
    for ax, (F, p) in zip(np.atleast_1d(axes), pools.items()):
        edges = np.array(p["hist"]["edges"])
        for label, colour in (("safe", "tab:blue"), ("harmful", "tab:red")):
            ax.stairs(p["hist"][label], edges, fill=True, alpha=0.5, color=colour, label=label)
        ax.set_title(f"{F} left out", fontsize=9)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.supxlabel("guard score (higher = more suspicious)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def render(result: dict, plots_dir: Path) -> str:
    lines = [f"## {NAME}", "", QUESTION, "", f"`{result['command']}` (seed {result['seed']}; pools of "
             f"{result['data']['pool_size']} rows at {', '.join(f'{r:.0%}' for r in result['data']['rates'])} harmful, "
             f"{result['data']['draws']} draws each)", "",
             "Left-out family: the guard trained on every other family. Removed fraction vs truth at each rate "
             "(mean ± sd over draws); v1 = the packaged guard v1 on the same pools (v1 learned from BeaverTails' judge "
             "half and Llama-2 refusals, so its beavertails row, and partly its refusals and sbr rows, are not "
             "left-out numbers).", "",
             "| left out | AUROC | v1 AUROC | removed @0% | @10% | @30% | v1 removed @0/10/30% | F1 @30% | refusals kept | 90% coverage | unlike-training flagged |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for F, r in result["families"].items():
        pools = r["pools"]
        by = {rate: [p for p in pools if p["rate"] == rate] for rate in result["data"]["rates"]}
        v1 = [p["v1"] for p in pools]
        v1rem = "/".join(f"{np.mean([p['v1']['removed_fraction'] for p in by[rate]]):.2f}" for rate in by)
        lines.append(f"| {F} | {_fmt(_summary(pools, 'auroc'))} | {_fmt(_summary(v1, 'auroc'))} | "
                     + " | ".join(_fmt(_summary(by[rate], "removed_fraction")) for rate in by)
                     + f" | {v1rem} | {_fmt(_summary(by[0.3], 'f1'))} | {_fmt(_summary(pools, 'refusals_kept'))} | "
                     f"{r['coverage']:.2f} | {sum(p['unlike_training'] for p in pools)}/{len(pools)} |")
    lines += ["", "Targets on every left-out family (measured value; ✓ met, ✗ not met):", "",
              "| left out | AUROC >= 0.85 | abs(removed - true) <= 0.05 | removed at 0% <= 0.03 | estimate ceiling: region-wise / pooled | 90% coverage | 30 chosen labels: error <= 0.03 and below 100 random (random 100); ceiling (way) | v1: AUROC / error / at 0% |",
              "|---|---|---|---|---|---|---|---|"]
    mark = lambda t: f"{t['measured'] if t['measured'] is not None else '-'} {'✓' if t['met'] else '✗'}"  # noqa: E731
    for F, r in result["families"].items():
        t, v = r["targets"], r["v1_targets"]
        c, cr = r["estimate_ceiling"], r["estimate_ceiling_region"]
        lab = t.get("labels_30")
        lab = "-" if lab is None else (f"{mark(lab)} ({'-' if lab['random_100'] is None else lab['random_100']})"
                                       + (f"; ceiling {lab['ceiling']:.3f} ({lab['ceiling_way']})" if "ceiling" in lab else ""))
        lines.append(f"| {F} | {mark(t['auroc'])} | {mark(t['removed_error'])} | {mark(t['removed_at_0'])} | "
                     f"{cr['best_worst_error']:.3f} ({_levels(cr)}) / {c['best_worst_error']:.3f} ({_levels(c)}); chosen {r['guard']['level']:g} | "
                     f"{r['coverage']:.2f} | {lab} | {mark(v['auroc'])} / {mark(v['removed_error'])} / {mark(v['removed_at_0'])} |")
    lines += ["", "The estimate before the interval's cap, region-wise as shipped (`saft.regions`) and pooled (one pair "
              "of rates for the whole pool), worst abs(estimate - truth) over the family's pools:", "",
              "| left out | region-wise | pooled |", "|---|---|---|"]
    for F, r in result["families"].items():
        e = r["targets"].get("estimate_error", {})
        lines.append(f"| {F} | {e.get('estimate', '-')} | {e.get('estimate_pooled', '-')} |")
    uploads = {F: r["upload"] for F, r in result["families"].items() if r.get("upload")}
    if uploads:
        up_rates = sorted({p["rate"] for u in uploads.values() for p in u})
        lines += ["", f"Task data with one family's harm (a user's upload): {result['data']['pool_size']} Alpaca/Dolly "
                  "rows outside every guard's training and calibration rows, a share replaced by harmful rows of the "
                  "left-out family, scored by the guard trained without that family (removed fraction, mean ± sd; "
                  "worst abs(estimate - truth) region-wise / pooled):", "",
                  "| harm from | AUROC | " + " | ".join(f"removed @{r:.0%}" for r in up_rates)
                  + " | estimate error: region / pooled | v1 removed |", "|---|---|" + "---|" * len(up_rates) + "---|---|"]
        for F, pools in uploads.items():
            by = {rate: [p for p in pools if p["rate"] == rate] for rate in up_rates}
            e = targets_of(pools)["estimate_error"]
            v1rem = "/".join(f"{np.mean([p['v1']['removed_fraction'] for p in by[rate]]):.2f}" for rate in by)
            lines.append(f"| {F} | {_fmt(_summary(pools, 'auroc'))} | "
                         + " | ".join(_fmt(_summary(by[rate], "removed_fraction")) for rate in by)
                         + f" | {e['estimate']} / {e['estimate_pooled']} | {v1rem} |")
    lines += ["", "v1's beavertails row above scores pools that hold v1's own training rows (its 'judge' half of "
              "BeaverTails' prompts); the held-out table below compares the two guards on rows neither trained on.",
              "", "Estimate ceiling: the worst |estimate - truth| over the family's pools at the level that would "
              "have been best in hindsight (chosen on the left-out family itself, so a limit of the estimator, not a "
              "result), for the region-wise count shipped (each level's region rates measured on the held-out rows) "
              "and the pooled count (one pair of rates for the pool); chosen = the level picked from the training "
              "families alone.", "",
              "Labels: the calibrated rule (`saft filter --labels-file`, the left-out guard's estimate as its prior) "
              "with the truth of 30 rows chosen by `saft label` or of 100 uniformly random rows (a third of a "
              f"{result['data']['pool_size']}-row pool), "
              f"{result['data'].get('label_draws', '?')} draws each, on the 10% and 30% pools (at 0% every label is "
              "safe and the rule refuses); the removal-count error of the worst pool, each pool's error the mean "
              "over its draws. Its ceiling: the lowest worst-pool error over 12 ways to spend the same 30 labels, "
              "design / estimator (`benchmarks/suites/_label_ceiling.py`: rows chosen by `saft label`, 30 even rank "
              "strata, or 15 chosen then 15 where a fit on those is unsure; the shipped rule, Platt without the "
              "prior, isotonic, or each label standing for its rank neighbours), chosen on the left-out family "
              "itself, so a limit of what was tried, not a result."]
    margin_rows = []
    for F, r in result["families"].items():
        for arm in LABEL_ARMS:
            for rate in (0.1, 0.3):
                m = [p["labels"][arm]["margin"] for p in r["pools"]
                     if p["rate"] == rate and "labels" in p and "margin" in p["labels"][arm]]
                if m:
                    v = {k: np.mean([x[k] for x in m]) for k in m[0]}
                    margin_rows.append(f"| {F} | {arm} | {rate:.0%} | {v['harmful_kept']:.3f} → "
                                       f"{v['harmful_kept_margin']:.3f} | {v['safe_removed']:.3f} → "
                                       f"{v['safe_removed_margin']:.3f} |")
    if margin_rows:
        lines += ["", f"The calibrated rule's margin: `saft filter` with labels removes {MARGIN:g} standard errors "
                  "of its estimate past the estimated count. Share of the harmful rows kept and of the safe rows "
                  "removed, at the count → with the margin (means over the pools and label draws above):", "",
                  "| left out | labels | rate | harmful kept | safe removed |", "|---|---|---|---|---|", *margin_rows]
    free_rows = []
    for F, r in result["families"].items():
        for rate in sorted({p["rate"] for p in r["pools"]}):
            m = [p["margin"] for p in r["pools"] if p["rate"] == rate and "margin" in p]
            if m:
                v = {k: None if m[0][k] is None else np.mean([x[k] for x in m]) for k in m[0]}
                kept = "-" if v["harmful_kept"] is None else f"{v['harmful_kept']:.3f} → {v['harmful_kept_margin']:.3f}"
                removed = f"{v['safe_removed']:.3f} → {v['safe_removed_margin']:.3f}"
                free_rows.append(f"| {F} | {rate:.0%} | {kept} | {removed} |")
    if free_rows:
        lines += ["", f"The label-free rule's margin: `saft filter` without labels removes {MARGIN:g} standard "
                  "errors of its estimate (the count's sampling noise) past the estimated count, never past the "
                  "interval's upper end. Share of the harmful rows kept and of the safe rows removed, at the count → with the "
                  "margin (means over the pools above):", "",
                  "| left out | rate | harmful kept | safe removed |", "|---|---|---|---|", *free_rows]
    cov = [p["covered"] for r in result["families"].values() for p in r["pools"]]
    lines += ["", f"Interval coverage over all left-out pools: {np.mean(cov):.2f} (target >= {TARGETS['coverage']}).",
              "", "The trust warning (pool unlike the training rows, or interval wider than "
              f"{result.get('wide', 0.1):g}) on pools whose removal count misses the truth by more than "
              f"{TARGETS['removed_error']} and on pools within it:", "",
              "| left out | count off: warned | count within: warned |", "|---|---|---|"]
    for F, r in result["families"].items():
        w = r.get("warnings")
        if w:
            lines.append(f"| {F} | {w['off_warned']}/{w['off']} | {w['within_warned']}/{w['within']} |")
    lines += ["",
              "", "The guard of every family (guard v3's recipe) on each family's held-out slice outside its "
              "calibration half (rows no guard trained on or measured its rates on; one-class families with the "
              "donor rows as harmful; pools of at most 150 rows, fewer where the slice is small); the estimate "
              "region-wise and, last column, pooled:", "",
              "| family | safe | harmful | AUROC | v1 AUROC | rows v1 never saw: n, AUROC, v1 AUROC | fpr at 0 | tpr at 0 | estimate error @0% | @10% | @30% | pooled @0/10/30% |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f3 = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for F, h in result["guard_all_families"]["heldout"].items():
        lines.append(f"| {F} | {h['n_safe']} | {h['n_harmful']} | {h['auroc']:.3f} | {f3(h.get('v1_auroc'))} | "
                     f"{h.get('n_unseen_by_v1', '-')}, {f3(h.get('auroc_unseen_by_v1'))}, {f3(h.get('v1_auroc_unseen_by_v1'))} | {h['fpr_at_0']:.3f} | "
                     f"{h['tpr_at_0']:.3f} | {h['estimate_error_0']:+.3f} | {h['estimate_error_10']:+.3f} | "
                     f"{h['estimate_error_30']:+.3f} | "
                     + "/".join(f"{h[f'pooled_error_{r}']:+.3f}" if f"pooled_error_{r}" in h else "-" for r in (0, 10, 30)) + " |")
    if _plot_scores(result, plots_dir / "detection_scores.png"):
        lines += ["", "Score distributions by label, each family's first 30%-harmful pool, the guard trained without it:", "",
                  "![score distributions](results/plots/detection_scores.png)"]
    return "\n".join(lines) + "\n"
