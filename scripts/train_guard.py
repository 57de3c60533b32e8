"""Train the label-free guard detector: guard v3 (default; v2's models counting region by region), v2 or v1.

    python scripts/train_guard.py [--version 3] [--raw-dir ../shared/data/raw] [--cap 2000] [--limit 800]
    python scripts/train_guard.py --version 2 [--raw-dir ../shared/data/raw] [--cap 2000] [--limit 800]
    python scripts/train_guard.py --version 1 [--raw-dir ../shared/data/raw] [--C 1.0] [--rbf-C 1.0]

Guard v3 (default) is guard v2's models with a region-wise estimate (saft.regions): it reads the shipped v2
files, fits the region model (a logistic regression from the sentence view to the source family) on v2's training
rows, measures each fold model's rates per region on the held-out calibration rows (refusals by their text), and
writes src/saft/guard_minilm_v3.json, which names v2's RBF file (the models are the same, so nothing is copied).

Guard v2 writes src/saft/guard_minilm_v2.json, src/saft/guard_minilm_rbf_v2.npz and its training rows
src/saft/guard_rows_v2.jsonl.gz (described in src/saft/guard_v2_README.md). It learns from every source family
of saft.pools.FAMILIES (BeaverTails, JailbreakBench, SBR, the refusal sets, benign look-alikes, benign task
data): each family's 'train' part (no judge_reserved prompt, no holdout_slice prompt), at most --cap rows a
family drawn from its fixed --limit subset (every row of saft.guard_training.FULL_FAMILIES, i.e. BeaverTails), the
rows benchmarks/suites/detection.py embeds. Its fold models
are one per family, each trained without that family (saft.guard_training.fit_guard), so the rates of
its contamination estimate and their spread (the interval of saft.trust) were measured on unseen families.
The sentence view is cached row by row under $SAFT_CACHE/rowviews.

Guard v1 writes src/saft/guard_minilm_v1.json (weights + measured rates) and src/saft/guard_minilm_rbf_v1.npz.
Training rows (all from shared/data/raw): BeaverTails 30k_test safe and unsafe pairs whose prompt is in the
'judge' half of saft.pools.prompt_split, and the 1015 refusals of a safety-tuned Llama-2-chat to harmful
prompts (labelled safe). None of the sources of the task pools' benign rows (Alpaca, Dolly) or refusals
(safety-tuned-llamas) is used, and no BeaverTails prompt of the 'experiment' half, so the benchmark's task pools
and every experiment pool hold only sources or prompts the guard never saw.
True- and false-positive rates come from 5-fold cross-validation grouped by prompt (those at log-odds 0 are
reported). The five fold models are shipped too, for the contamination estimate: each one's rates at its own
threshold were measured on rows it did not train on, the situation of a user's pool, while the final model,
trained on every row, scores new harmful rows higher than cross-validation did (in a development run of
benchmarks/estimate.py, 13-30% of the pools' harmful rows crossed its threshold against 15% in cross-validation,
so its estimates came out high). The threshold is a quantile of held-out harmful scores, its level chosen here
from the training rows alone (`choose_estimate_level`). The AUROC on the 'experiment' half of BeaverTails is reported.
The RBF support vector machine (scikit-learn's SVC with its default C 1 and gamma 'scale', balanced classes) is
trained on the same rows, with its own five fold models and estimate level chosen the same way (the estimate
with kernel="rbf"); all ship in the .npz, its grouped cross-validation and test AUROC in the JSON's meta.
"""

import argparse
import os
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.base import clone
from sklearn.model_selection import GroupKFold
from sklearn.svm import SVC

from saft.data import atomic_open, write_json
from saft.detectors.guard import GUARD_FILE
from saft.encoders import ENCODER_VERSION, embed_pairs
from saft.guard_training import (FULL_FAMILIES, RowViews, cap_rows, choose_estimate_level, fit_guard, rbf_arrays,
                                 save_guard, save_region_guard, train_limit)
from saft.pools import FAMILIES, calibration_half, guard_training_rows, holdout_slice, family_rows, load_source, prompt_split
from saft.trust import distance_threshold

V2_FILE = GUARD_FILE.with_name("guard_minilm_v2.json")
V2_KERNEL = GUARD_FILE.with_name("guard_minilm_rbf_v2.npz")
V2_ROWS = GUARD_FILE.with_name("guard_rows_v2.jsonl.gz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", type=int, choices=(1, 2, 3), default=3)
    ap.add_argument("--raw-dir", default=None)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--rbf-C", type=float, default=1.0)
    ap.add_argument("--cap", type=int, default=2000, help="v2: training rows per family at most")
    ap.add_argument("--limit", type=int, default=800, help="v2: the fixed subset of each family it draws from")
    ap.add_argument("--cache-dir", default=None, help="v2: row cache of the sentence view (default $SAFT_CACHE)")
    args = ap.parse_args()
    if args.version == 2:
        return build_v2(args)
    if args.version == 3:
        return build_v3(args)
    bt = load_source("bt_safe", args.raw_dir) + load_source("bt_unsafe", args.raw_dir)
    train = guard_training_rows(args.raw_dir)
    test = [r for r in bt if prompt_split(r["prompt"]) == "experiment"]
    embed = lambda rows: embed_pairs([r["prompt"] for r in rows], [r["response"] for r in rows], progress=True)  # noqa: E731
    X, y = embed(train), np.array([r["harmful"] for r in train])
    groups = np.unique([r["prompt"] for r in train], return_inverse=True)[1]
    # Balanced classes: the pools it will score have 5-30% harmful rows, unlike the training mix.
    lr = LogisticRegression(C=args.C, class_weight="balanced", max_iter=5000)
    cv = np.zeros(len(y))
    splits = list(GroupKFold(n_splits=5).split(X, y, groups))
    fold_models = [clone(lr).fit(X[fit], y[fit]) for fit, _ in splits]
    for model, (_, held) in zip(fold_models, splits):
        cv[held] = model.decision_function(X[held])
    level, worst = choose_estimate_level(cv, y, np.array([r["source"] for r in train]))
    folds = []
    for model, (_, held) in zip(fold_models, splits):
        z, yh = cv[held], y[held]
        t = float(np.quantile(z[yh == 1], level))
        folds.append({"coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]), "threshold": t,
                      "tpr": float((z[yh == 1] > t).mean()), "fpr": float((z[yh == 0] > t).mean())})
    lr.fit(X, y)
    yt = np.array([r["harmful"] for r in test])
    Xt = embed(test)
    zt = lr.decision_function(Xt)
    meta = {
        "version": 1, "encoder": ENCODER_VERSION, "classifier": f"LogisticRegression(C={args.C}, class_weight='balanced')",
        "train": f"BeaverTails 30k_test pairs with prompt_split == 'judge' plus refusals_llama2chat_1015.csv as safe "
                 f"({len(train)} rows, {int(y.sum())} harmful)",
        "cv_tpr": round(float((cv[y == 1] > 0).mean()), 4), "cv_fpr": round(float((cv[y == 0] > 0).mean()), 4),
        "cv_auroc": round(float(roc_auc_score(y, cv)), 4),
        # The contamination estimate: the fold models' adjusted counts above their `estimate_level` threshold.
        "estimate_level": level, "estimate_level_worst_rmse": {str(k): v for k, v in worst.items()},
        "test": f"BeaverTails pairs with prompt_split == 'experiment' ({len(test)} rows, {int(yt.sum())} harmful)",
        "test_auroc": round(float(roc_auc_score(yt, zt)), 4),
        "built_by": "python scripts/train_guard.py" + (f" --C {args.C}" if args.C != 1.0 else "")
        + (f" --rbf-C {args.rbf_C}" if args.rbf_C != 1.0 else ""),
    }
    # The RBF model, and its own five fold models for the estimate (same splits, level chosen the same way).
    svc = SVC(C=args.rbf_C, kernel="rbf", gamma="scale", class_weight="balanced")
    svc_folds = [clone(svc).fit(X[fit], y[fit]) for fit, _ in splits]
    svc_cv = np.zeros(len(y))
    for model, (_, held) in zip(svc_folds, splits):
        svc_cv[held] = model.decision_function(X[held])
    svc_level, svc_worst = choose_estimate_level(svc_cv, y, np.array([r["source"] for r in train]))
    svc.fit(X, y)
    arrays = {}
    for i, (model, (_, held)) in enumerate(zip(svc_folds, splits)):
        z, yh = svc_cv[held], y[held]
        t = float(np.quantile(z[yh == 1], svc_level))
        arrays.update({f"fold{i}_{k}": v for k, v in rbf_arrays(model).items()})
        arrays.update({f"fold{i}_threshold": t, f"fold{i}_tpr": float((z[yh == 1] > t).mean()),
                       f"fold{i}_fpr": float((z[yh == 0] > t).mean())})
    kernel_file = GUARD_FILE.with_name("guard_minilm_rbf_v1.npz")
    with atomic_open(kernel_file, "wb") as f:
        np.savez_compressed(f, **rbf_arrays(svc), n_folds=len(svc_folds), **arrays)
    meta["kernel_model"] = {"classifier": f"SVC(C={args.rbf_C}, kernel='rbf', gamma='scale', class_weight='balanced')",
                            "gamma": float(svc._gamma), "n_support": int(len(svc.support_)),
                            "estimate_level": svc_level,
                            "estimate_level_worst_rmse": {str(k): v for k, v in svc_worst.items()},
                            "cv_auroc": round(float(roc_auc_score(y, svc_cv)), 4),
                            "test_auroc": round(float(roc_auc_score(yt, svc.decision_function(Xt))), 4)}
    write_json({"coef": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0]), "estimate_folds": folds,
                "kernel_model": kernel_file.name, "meta": meta}, GUARD_FILE)
    print(f"wrote {GUARD_FILE} and {kernel_file}: {meta}")


def _v2_rows(args):
    """Guard v2's rows: (views, training rows, their view, families, labels, held-out calibration rows, heldout)."""
    cache = args.cache_dir or os.environ.get("SAFT_CACHE", str(Path.home() / ".cache" / "saft"))
    views = RowViews(cache, progress=True)
    views.seed_from_shipped()
    rows = [r for f in FAMILIES for r in family_rows(f, args.raw_dir, part="train", limit=train_limit(f, args.limit))]
    fam = np.array([r["family"] for r in rows])
    y = np.array([r["harmful"] for r in rows])
    keep = cap_rows(fam, y, args.cap, seed=0)
    rows, fam, y = [rows[i] for i in keep], fam[keep], y[keep]
    X = views(rows)
    held_rows = [r for f in FAMILIES for r in family_rows(f, args.raw_dir, part="holdout", limit=train_limit(f, args.limit))
                 if calibration_half(r["prompt"])]
    heldout = (views(held_rows), np.array([r["harmful"] for r in held_rows]), np.array([r["family"] for r in held_rows]))
    return views, rows, X, fam, y, held_rows, heldout


def build_v3(args) -> None:
    """Guard v3: guard v2's files with the region-wise estimate (saft.regions) in the meta."""
    import gzip
    import json

    from saft.detectors.guard import GUARDS
    from saft.regions import refusal_mask

    _, rows, X, fam, _, held_rows, heldout = _v2_rows(args)
    with gzip.open(V2_ROWS, "rt", encoding="utf-8") as fh:
        shipped = [(r["prompt"], r["response"]) for r in map(json.loads, fh)]
    if shipped != [(r["prompt"], r["response"]) for r in rows]:
        raise SystemExit(f"{V2_ROWS} does not hold the rows this recipe draws: rebuild guard v2 first "
                         "(--version 2) with the same --cap and --limit")
    refusal = refusal_mask([r["response"] for r in held_rows])
    meta = {"version": 3,
            "region_rows": {"model": f"the {len(rows)} training rows of guard v2 (guard_rows_v2.jsonl.gz), by family",
                            "rates": f"{len(held_rows)} held-out calibration rows (holdout_slice and calibration_half), "
                                     f"{int(refusal.sum())} of them refusals by their text"},
            "built_by": "python scripts/train_guard.py --version 3" + (f" --cap {args.cap}" if args.cap != 2000 else "")
            + (f" --limit {args.limit}" if args.limit != 800 else "")}
    regions = save_region_guard(V2_FILE, GUARDS["v3"], X, fam, heldout, refusal, meta=meta)
    print(f"wrote {GUARDS['v3']}: regions {regions.classes}, refusal")


def build_v2(args) -> None:
    """Guard v2: every family's training part (at most --cap rows a family, from its --limit subset), folded by
    family (saft.guard_training.fit_guard), with the trust calibration of saft.trust in its meta."""
    import gzip
    import json

    views, rows, X, fam, y, held_rows, heldout = _v2_rows(args)
    g = fit_guard(X, y, fam, heldout=heldout, C=args.rbf_C, linear_C=args.C)
    held = {f: views(family_rows(f, args.raw_dir, part="holdout", limit=args.limit)) for f in FAMILIES}
    dist = distance_threshold(held, g.rbf["support_vectors"])
    counts = {f: {"rows": int((fam == f).sum()), "harmful": int(y[fam == f].sum())} for f in FAMILIES}
    trust = {"distance_threshold": dist["threshold"], "distance_per_family": dist["per_family"]}
    meta = {
        "version": 2, "encoder": ENCODER_VERSION,
        "classifier": f"LogisticRegression(C={args.C}, class_weight='balanced')",
        "train": f"saft.pools.family_rows(part='train', limit={args.limit}; no limit for {', '.join(FULL_FAMILIES)}) "
                 f"of every family, at most {args.cap} rows a family ({len(y)} rows, {int(y.sum())} harmful); no judge_reserved or holdout_slice prompt",
        "train_families": counts, "folds": "one per family, trained without it", "fold_families": g.fold_families,
        "built_by": "python scripts/train_guard.py --version 2" + (f" --cap {args.cap}" if args.cap != 2000 else "")
        + (f" --limit {args.limit}" if args.limit != 800 else ""),
    }
    meta["kernel_model"] = {"classifier": f"SVC(C={args.rbf_C}, kernel='rbf', gamma='scale', class_weight='balanced')",
                            "cv_auroc_family_held_out": round(float(roc_auc_score(y, g.cv)), 4)}
    save_guard(g, V2_FILE, V2_KERNEL, meta=meta, trust=trust)
    with atomic_open(V2_ROWS, "wb") as fh, gzip.open(fh, "wt", encoding="utf-8") as gz:
        for r in rows:
            gz.write(json.dumps({k: r[k] for k in ("prompt", "response", "harmful", "family", "source", "category")},
                                ensure_ascii=False) + "\n")
    print(f"wrote {V2_FILE}, {V2_KERNEL} and {V2_ROWS}: {json.dumps(meta, indent=1)}")


if __name__ == "__main__":
    main()
