"""Train the label-free guard detector and write src/saft/guard_minilm_v1.json (weights + measured rates) and
src/saft/guard_minilm_rbf_v1.npz (the RBF model that ranks by default).

    python scripts/train_guard.py [--raw-dir ../shared/data/raw] [--C 1.0] [--rbf-C 1.0]

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

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.base import clone
from sklearn.model_selection import GroupKFold
from sklearn.svm import SVC

from saft.data import atomic_open, write_json
from saft.detectors.guard import GUARD_FILE
from saft.encoders import ENCODER_VERSION, embed_pairs
from saft.pools import guard_training_rows, load_source, prompt_split


LEVELS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
RATES = (0.05, 0.1, 0.2, 0.3)


def choose_estimate_level(cv: np.ndarray, y: np.ndarray, source: np.ndarray, *, reps: int = 100,
                          seed: int = 0) -> tuple[float, dict]:
    """The quantile of the harmful rows' scores at which the guard counts flagged rows for its estimate.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-dir", default=None)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--rbf-C", type=float, default=1.0)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
