"""Train the TF-IDF harmfulness judge and write src/saft/judge_tfidf_v1.npz (weights + its measured accuracy).

    python scripts/train_text_judge.py [--raw-dir ../shared/data/raw]

Rows: only those whose prompt is `saft.pools.judge_reserved` (detectors and their guards never train on them):
BeaverTails safe/unsafe answers (labelled by BeaverTails), refusals to harmful prompts (Llama-2-chat and
safety-tuned-llamas, labelled safe, so the judge reads a refusal as safe) and JailbreakBench answers (labelled by
the benchmark's judge; behaviours whose goal is an evaluation prompt are left out). Reserved prompts are split
again by hash: 3 in 4 train, 1 in 4 test. The MiniLM judge is measured on the test rows it never saw either
(BeaverTails rows of the 'judge' half trained it, so those are left out of the comparison).
"""

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from saft.data import load_prompts
from saft.judges import TEXT_JUDGE_FILE, TextJudge, get_judge
from saft.pools import default_raw_dir, judge_reserved, load_source, prompt_split


def norm(p: str) -> str:
    return " ".join(p.lower().split())


def jailbreakbench_rows(raw: Path, banned: set[str]) -> list[dict]:
    rows = []
    for f in sorted((raw / "jailbreakbench").glob("*.json")):
        for j in json.loads(f.read_text())["jailbreaks"]:
            if not j.get("response") or not j.get("goal") or norm(j["goal"]) in banned:
                continue
            rows.append({"prompt": j["goal"], "response": j["response"], "harmful": int(bool(j["jailbroken"])),
                         "source": "jailbreakbench"})
    return rows


def is_test(prompt: str) -> bool:
    return hashlib.sha1(prompt.encode("utf-8")).digest()[3] % 4 == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-dir", default=None)
    ap.add_argument("--C", type=float, default=4.0)
    ap.add_argument("--no-minilm", action="store_true", help="skip measuring the MiniLM judge on the same rows")
    args = ap.parse_args()
    raw = Path(args.raw_dir) if args.raw_dir else default_raw_dir()
    banned = {norm(p) for p in load_prompts(raw / "advbench.txt") + load_prompts(raw / "eval_malicious_instructions.json")}
    refusals = [{**r, "harmful": 0} for r in load_source("refusal_llama2", raw) + load_source("refusal", raw)]
    rows = load_source("bt_safe", raw) + load_source("bt_unsafe", raw) + refusals + jailbreakbench_rows(raw, banned)
    rows = [r for r in rows if judge_reserved(r["prompt"])]
    train = [r for r in rows if not is_test(r["prompt"])]
    test = [r for r in rows if is_test(r["prompt"])]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    judge = TextJudge(C=args.C).fit(None, [r["response"] for r in train], [r["harmful"] for r in train])

    def measure(j, subset):
        y = np.array([r["harmful"] for r in subset])
        p = j.harmful_proba([r["prompt"] for r in subset], [r["response"] for r in subset])
        return {"auroc": round(float(roc_auc_score(y, p)), 4), "accuracy": round(float(accuracy_score(y, p > 0.5)), 4),
                "n": len(subset), "harmful": int(y.sum())}

    def by_source(subset):
        return {s: sum(r["source"] == s for r in subset) for s in sorted({r["source"] for r in subset})}

    # Rows neither judge trained on: the MiniLM judge saw BeaverTails pairs of the 'judge' half.
    common = [r for r in test if not (r["source"].startswith("bt_") and prompt_split(r["prompt"]) == "judge")]
    own, own_common = measure(judge, test), measure(judge, common)
    judge.meta = {
        "version": 1, "features": "hashed word 1-2 grams and char_wb 3-5 grams of the answer (2^20 each), "
        "sublinear TF-IDF, each block L2-normalised", "classifier": f"LogisticRegression(C={args.C})",
        "train": f"judge_reserved prompts, 3 in 4 by a 4th hash byte: {len(train)} rows {by_source(train)}, "
                 f"{sum(r['harmful'] for r in train)} harmful",
        "test": f"the other reserved prompts: {len(test)} rows {by_source(test)}", "test_auroc": own["auroc"],
        "test_accuracy": own["accuracy"],
        "comparison": {"rows": f"test rows no judge trained on: {len(common)} {by_source(common)}",
                       "tfidf": own_common},
        "built_by": "python scripts/train_text_judge.py",
    }
    if not args.no_minilm:
        judge.meta["comparison"]["minilm"] = measure(get_judge("minilm"), common)
    for src in sorted({r["source"] for r in common}):
        sub = [r for r in common if r["source"] == src]
        if len({r["harmful"] for r in sub}) == 1:  # AUROC needs both labels: report accuracy only
            y = np.array([r["harmful"] for r in sub])
            judge.meta["comparison"].setdefault("accuracy_by_source", {})[src] = round(float(accuracy_score(
                y, judge.harmful_proba(None, [r["response"] for r in sub]) > 0.5)), 4)
    judge.save(TEXT_JUDGE_FILE)
    print(json.dumps(judge.meta, indent=1))
    print(f"wrote {TEXT_JUDGE_FILE} ({TEXT_JUDGE_FILE.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
