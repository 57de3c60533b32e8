"""The guard's label-free contamination estimate against the truth, on pools the guard never trained on.

    python benchmarks/estimate.py [--seeds 0 1 2] [--n 1000]

Pools T10, T30, B10, B30, H10, H30 as in detect.py, drawn with each seed in --seeds (seed 0 = detect.py's
pools), keeping only rows whose prompt the guard never saw in training. For each pool: the truth, the shipped
estimate (GuardScorer.contamination_estimate: the RBF classifier's fold models, the default since session 5),
the same from the linear classifier's fold models (the estimate of sessions 3-4), and, measured in the same run
as the baseline, the adjusted count at the linear classifier's own threshold (log-odds 0, cross-validated tpr
and fpr) that the guard used before. Also the share of the pool's safe rows above the estimate's threshold against the
false-positive rate the correction assumes: the gap between the two is the estimate's bias, and it needs labels
to measure. Only the sentence-encoder view is computed (cached in benchmarks/.cache/sentence). Rewrites the
estimate section of RESULTS.md and saves results/estimate.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect import HERE, SEEDED_POOLS, write_results_md  # noqa: E402
from detect_plus import guard_training_prompts  # noqa: E402

from saft import GuardScorer  # noqa: E402
from saft.data import write_json  # noqa: E402
from saft.encoders import sentence_features  # noqa: E402
from saft.pipeline import versions  # noqa: E402

def adjusted_count(z: np.ndarray, threshold: float, tpr: float, fpr: float) -> float:
    return float(np.clip(((z > threshold).mean() - fpr) / (tpr - fpr), 0, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="label-free contamination estimate benchmark")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    seen = guard_training_prompts(None)
    guard = GuardScorer().load_weights()
    linear = GuardScorer(kernel="linear").load_weights()
    m = guard.meta_
    res = {"command": "python benchmarks/estimate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seeds": args.seeds, "versions": versions(), "date": time.strftime("%Y-%m-%d"),
           "guard": {"estimate_level": m["kernel_model"]["estimate_level"], "cv_tpr": m["cv_tpr"], "cv_fpr": m["cv_fpr"],
                     "fold_tpr": [f["tpr"] for f in guard.estimate_models_],
                     "fold_fpr": [f["fpr"] for f in guard.estimate_models_]},
           "pools": {}}
    for name, build in SEEDED_POOLS.items():
        for seed in args.seeds:
            samples = build(args.n, seed)
            unseen = np.array([s.prompt not in seen for s in samples])
            y = np.array([s.label for s in samples])[unseen]
            S = sentence_features(samples, cache_dir=HERE / ".cache" / "sentence", progress=False)[unseen]
            folds = list(zip(guard.estimate_models_, guard.fold_decisions(S)))  # each fold model's scores, once
            res["pools"][f"{name} seed {seed}"] = {
                "pool": name, "seed": seed, "n": int(unseen.sum()), "truth": float(y.mean()),
                "estimate": guard.contamination_estimate(S),
                "linear": linear.contamination_estimate(S),
                "baseline": adjusted_count(linear.score_samples(S), 0.0, m["cv_tpr"], m["cv_fpr"]),
                # per fold model: share of the pool's safe / harmful rows above its threshold
                "safe_above": [float((z[y == 0] > f["threshold"]).mean()) for f, z in folds],
                "harmful_above": [float((z[y == 1] > f["threshold"]).mean()) for f, z in folds]}
    res["seconds"] = time.time() - t0
    write_json(res, HERE / "results" / "estimate.json")
    text = render(res)
    print(text)
    if not args.no_write:
        write_results_md(text, key="estimate", title="Label-free contamination estimate (benchmarks/estimate.py)")
    return 0


def render(res: dict) -> str:
    g = res["guard"]
    lines = [f"Command: `{res['command']}`; pool seeds {', '.join(map(str, res['seeds']))}; rows whose prompt the guard "
             f"never saw. Versions: {json.dumps(res['versions'])}. Date: {res['date']}, {res['seconds']:.0f} s.  ",
             f"Shipped: mean over the RBF classifier's 5 fold models of the adjusted count above each one's "
             f"{g['estimate_level']} quantile of held-out harmful scores (held-out tpr {np.mean(g['fold_tpr']):.3f}, fpr "
             f"{np.mean(g['fold_fpr']):.4f}, means over folds). Linear: the same with the logistic regression's fold "
             f"models (sessions 3-4). Baseline (before): the final linear model's adjusted count above log-odds 0 (tpr "
             f"{g['cv_tpr']}, fpr {g['cv_fpr']}). The last two columns (shipped folds, means) are what the estimate "
             "assumes them to be: the held-out fpr and tpr.", "",
             "| pool | seed | rows | truth | estimate | error | linear | linear error | baseline | baseline error | "
             "safe rows above the threshold | harmful rows above |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_pool: dict[str, list] = {}
    for r in res["pools"].values():
        err, lin, base = r["estimate"] - r["truth"], r["linear"] - r["truth"], r["baseline"] - r["truth"]
        by_pool.setdefault(r["pool"], []).append((abs(err), abs(lin), abs(base)))
        lines.append(f"| {r['pool']} | {r['seed']} | {r['n']} | {r['truth']:.3f} | {r['estimate']:.3f} | {err:+.3f} | "
                     f"{r['linear']:.3f} | {lin:+.3f} | {r['baseline']:.3f} | {base:+.3f} | {np.mean(r['safe_above']):.4f} | "
                     f"{np.mean(r['harmful_above']):.3f} |")
    lines += ["", "| pool | max abs error (estimate) | max abs error (linear) | max abs error (baseline) | "
              "linear / estimate (mean abs error) | baseline / estimate |", "|---|---|---|---|---|---|"]
    for pool, errs in by_pool.items():
        e = np.array(errs)
        mean = max(e[:, 0].mean(), 1e-9)
        lines.append(f"| {pool} | {e[:, 0].max():.3f} | {e[:, 1].max():.3f} | {e[:, 2].max():.3f} | "
                     f"{e[:, 1].mean() / mean:.1f}x | {e[:, 2].mean() / mean:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
