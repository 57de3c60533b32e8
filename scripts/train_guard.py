"""Train the label-free guard detector and write src/saft/guard_minilm_v1.json (weights + measured rates).

    python scripts/train_guard.py [--raw-dir ../shared/data/raw] [--C 1.0]

Training rows (all from shared/data/raw): BeaverTails 30k_test safe and unsafe pairs whose prompt is in the
'judge' half of saft.pools.prompt_split, and the 1015 refusals of a safety-tuned Llama-2-chat to harmful
prompts (labelled safe). None of the sources of the task pools' benign rows (Alpaca, Dolly) or refusals
(safety-tuned-llamas) is used, and no BeaverTails prompt of the 'experiment' half, so the benchmark's task pools
and every experiment pool hold only sources or prompts the guard never saw.
The true- and false-positive rates at log-odds 0 come from 5-fold cross-validation grouped by prompt; the
guard's contamination estimate depends on them. The AUROC on the 'experiment' half of BeaverTails is reported.
"""

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

from saft.data import write_json
from saft.detectors.guard import GUARD_FILE
from saft.encoders import ENCODER_VERSION, embed_pairs
from saft.pools import load_source, prompt_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-dir", default=None)
    ap.add_argument("--C", type=float, default=1.0)
    args = ap.parse_args()
    bt = load_source("bt_safe", args.raw_dir) + load_source("bt_unsafe", args.raw_dir)
    train = [r for r in bt if prompt_split(r["prompt"]) == "judge"] + load_source("refusal_llama2", args.raw_dir)
    test = [r for r in bt if prompt_split(r["prompt"]) == "experiment"]
    embed = lambda rows: embed_pairs([r["prompt"] for r in rows], [r["response"] for r in rows], progress=True)  # noqa: E731
    X, y = embed(train), np.array([r["harmful"] for r in train])
    groups = np.unique([r["prompt"] for r in train], return_inverse=True)[1]
    # Balanced classes: the pools it will score have 5-30% harmful rows, unlike the training mix.
    lr = LogisticRegression(C=args.C, class_weight="balanced", max_iter=5000)
    cv = cross_val_predict(lr, X, y, cv=GroupKFold(n_splits=5), groups=groups, method="decision_function")
    lr.fit(X, y)
    yt = np.array([r["harmful"] for r in test])
    zt = lr.decision_function(embed(test))
    meta = {
        "version": 1, "encoder": ENCODER_VERSION, "classifier": f"LogisticRegression(C={args.C}, class_weight='balanced')",
        "train": f"BeaverTails 30k_test pairs with prompt_split == 'judge' plus refusals_llama2chat_1015.csv as safe "
                 f"({len(train)} rows, {int(y.sum())} harmful)",
        "cv_tpr": round(float((cv[y == 1] > 0).mean()), 4), "cv_fpr": round(float((cv[y == 0] > 0).mean()), 4),
        "cv_auroc": round(float(roc_auc_score(y, cv)), 4),
        "test": f"BeaverTails pairs with prompt_split == 'experiment' ({len(test)} rows, {int(yt.sum())} harmful)",
        "test_auroc": round(float(roc_auc_score(yt, zt)), 4),
        "built_by": "python scripts/train_guard.py" + (f" --C {args.C}" if args.C != 1.0 else ""),
    }
    write_json({"coef": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0]), "meta": meta}, GUARD_FILE)
    print(f"wrote {GUARD_FILE}: {meta}")


if __name__ == "__main__":
    main()
