"""The calibrated rule with the guard's label-free estimate as a prior: how much weight should it get? And the
labelled default against the one before it, on the same label draws.

    python benchmarks/calibrated_prior.py [--seeds 0 1 2] [--pools T10 ... H30] [--fresh-pools T10 ... H30]
                                          [--weights 0 25 50 100 200 400] [--detector D] [--baseline D]

--detector (default guard-model-probe, the labelled default since session 8: layer 15 prompt_last +
response_mean; guard-probe reads prompt_last) on the pools of pool_seeds.py (rows whose prompt the guard never
saw), trained on 5 draws of 100 labels per pool. Each draw's scores go through `select_calibrated` with `prior` =
the guard's label-free estimate of the pool and each `prior_weight` (in labels; 0 = no prior, the rule before).
Per pool and weight: the spread of the removed count over the 5 draws as a share of the pool (the issue's
stability target is < 10%), mean F1, mean error of the rule's contamination estimate, and refusals kept (T and
H). The weight of 0 is the baseline of the same run. Per pool, the detector's mean AUROC over the 5 draws beside
that of --baseline (default guard-probe, the labelled default before), trained on the same draws in the same
run. Seed 0 (`--pools`) chooses the weight; seeds 1 and 2 are fresh draws (`--fresh-pools`) that check it (their
hidden states cost 4 to 9 minutes a B pool the first time with the CPU shared, cached under
benchmarks/.cache/seeds_all as for pool_seeds.py).
Rewrites the calibrated-prior section of RESULTS.md and saves results/calibrated_prior.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect import HERE, LABEL_SEEDS, SEEDED_POOLS, write_results_md  # noqa: E402
from detect_plus import MODEL_GUARD_POSITIONS, guard_reference, guard_training_prompts  # noqa: E402
from pool_seeds import unseen_pool  # noqa: E402

from saft import draw_labeled, get_detector, load_model  # noqa: E402
from saft.detectors import needs_reference  # noqa: E402
from saft.data import write_json  # noqa: E402
from saft.metrics import detection_metrics  # noqa: E402
from saft.pipeline import versions  # noqa: E402
from saft.select import select_calibrated  # noqa: E402


def fit_draw(name: str, views: dict, y_semi: np.ndarray, reference):
    """The named labelled detector fitted on its view of the pool (`views`: "first" = sentence view + hidden
    states at prompt_last, "all" = + response_mean) with the guard's rows when it trains on them; (detector, X)."""
    if needs_reference(name):
        return get_detector(name).fit(views["all"], y_semi, reference_X=reference[0], reference_y=reference[1]), views["all"]
    return get_detector(name).fit(views["first"], y_semi), views["first"]


def evaluate(y: np.ndarray, views: dict, refusal: np.ndarray, weights: list[float], *, detector: str, baseline: str,
             reference) -> dict:
    labels = y.tolist()
    draws, auroc, base_auroc = [], [], []
    for seed in LABEL_SEEDS:
        idx = draw_labeled(labels, 100, seed=seed)
        semi = np.full(len(y), -1)
        semi[idx] = y[idx]
        det, X = fit_draw(detector, views, semi, reference)
        draws.append((idx, det.score_samples(X)))
        auroc.append(float(roc_auc_score(y, draws[-1][1])))
        base, Xb = fit_draw(baseline, views, semi, reference)
        base_auroc.append(float(roc_auc_score(y, base.score_samples(Xb))))
    prior, _ = det.label_free_estimate_with_se(X)  # label-free: the same for every draw
    out = {"prior": prior, "labelled_share": [float(y[idx].mean()) for idx, _ in draws], "auroc": auroc,
           "baseline_auroc": base_auroc, "weights": {}}
    for w in weights:
        removed, f1, est, kept = [], [], [], []
        for idx, z in draws:
            sel = select_calibrated(z, z[idx], y[idx], prior=prior, prior_weight=w)
            removed.append(sel.n_removed)
            f1.append(detection_metrics(z, labels, sel.removed)["f1"])
            est.append(sel.params["contamination_estimate"])
            if refusal.any():
                kept.append(float((~sel.removed[refusal]).mean()))
        out["weights"][str(w)] = {"removed": removed, "spread": (max(removed) - min(removed)) / len(y),
                                  "f1": float(np.mean(f1)), "estimate": float(np.mean(est)),
                                  "estimate_error": float(np.mean(np.abs(np.array(est) - y.mean()))),
                                  "refusals_kept": float(np.mean(kept)) if kept else None}
    return out


def render(res: dict) -> str:
    ws = res["weights"]
    lines = [f"Command: `{res['command']}`; {res['detector']} (baseline {res['baseline']}), layer {res['layer']}, rows "
             f"whose prompt the guard never saw, label draws seeds {', '.join(map(str, LABEL_SEEDS))}. Versions: {res['versions']}. Date: {res['date']}, "
             f"{res['seconds']:.0f} s. Cells: removed-count spread over the 5 draws as a share of the pool / mean F1 / "
             "mean absolute error of the rule's contamination estimate.", "",
             f"| pool | seed | rows | truth | guard estimate | labelled share (5 draws) | AUROC (mean of 5 draws) | "
             f"{res['baseline']} AUROC | " + " | ".join(f"weight {w}" for w in ws) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(ws)]
    for r in res["pools"].values():
        cells = [f"{r['weights'][str(w)]['spread']:.1%} / {r['weights'][str(w)]['f1']:.3f} / {r['weights'][str(w)]['estimate_error']:.3f}"
                 for w in ws]
        lines.append(f"| {r['pool']} | {r['seed']} | {r['n']} | {r['truth']:.3f} | {r['prior']:.3f} | "
                     f"{min(r['labelled_share']):.2f}-{max(r['labelled_share']):.2f} | {np.mean(r['auroc']):.3f} | "
                     f"{np.mean(r['baseline_auroc']):.3f} | " + " | ".join(cells) + " |")
    lines += ["", "Over every pool and seed, against weight 0 (the rule without a prior) in the same run:", "",
              "| weight | pools with spread < 10% | largest spread | mean F1 change | mean estimate error | lowest refusals kept |",
              "|---|---|---|---|---|---|"]
    rows = list(res["pools"].values())
    gain = [np.mean(r["auroc"]) - np.mean(r["baseline_auroc"]) for r in rows]
    for w in ws:
        cell = [r["weights"][str(w)] for r in rows]
        base = [r["weights"][str(ws[0])] for r in rows]
        kept = [c["refusals_kept"] for c in cell if c["refusals_kept"] is not None]
        lines.append(f"| {w} | {sum(c['spread'] < 0.1 for c in cell)}/{len(cell)} | {max(c['spread'] for c in cell):.1%} | "
                     f"{np.mean([c['f1'] - b['f1'] for c, b in zip(cell, base)]):+.3f} | "
                     f"{np.mean([c['estimate_error'] for c in cell]):.3f} | {f'{min(kept):.1%}' if kept else '—'} |")
    lines += ["", f"AUROC of {res['detector']} minus that of {res['baseline']} (same draws, same run): mean {np.mean(gain):+.3f}, "
              f"range {min(gain):+.3f} to {max(gain):+.3f}; below the baseline on "
              + (", ".join(f"{r['pool']}/{r['seed']} ({g:+.3f})" for r, g in zip(rows, gain) if g < 0) or "no pool") + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the calibrated rule with the guard's estimate as a prior")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pools", nargs="+", default=list(SEEDED_POOLS), choices=list(SEEDED_POOLS),
                    help="pools of seed 0, which choose the weight")
    ap.add_argument("--fresh-pools", nargs="+", default=list(SEEDED_POOLS), choices=list(SEEDED_POOLS),
                    help="pools of the other seeds, which check it")
    ap.add_argument("--weights", type=float, nargs="+", default=[0, 25, 50, 100, 200, 400])
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--detector", default="guard-model-probe", choices=["guard-probe", "guard-model-probe"])
    ap.add_argument("--baseline", default="guard-probe", choices=["guard-probe", "guard-model-probe"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.weights[0] != 0:
        ap.error("the first weight is the baseline and must be 0")
    t0 = time.time()
    model, tok = load_model(None, device="cpu")
    seen = guard_training_prompts(None)
    res = {"command": "python benchmarks/calibrated_prior.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "layer": args.layer, "detector": args.detector, "baseline": args.baseline, "weights": [int(w) if float(w).is_integer() else w for w in args.weights],
           "versions": versions(), "date": time.strftime("%Y-%m-%d"), "pools": {}}
    reference = guard_reference(model, tok, layer=args.layer)  # the guard's rows in guard-model's view
    for seed in args.seeds:
        for name in args.pools if seed == 0 else args.fresh_pools:
            y, S, H, refusal = unseen_pool(name, seed, model, tok, seen, layer=args.layer, positions=MODEL_GUARD_POSITIONS)
            views = {"first": np.hstack([S, H[:, :H.shape[1] // len(MODEL_GUARD_POSITIONS)]]), "all": np.hstack([S, H])}
            r = evaluate(y, views, refusal, args.weights, detector=args.detector, baseline=args.baseline,
                         reference=reference)
            res["pools"][f"{name} seed {seed}"] = {"pool": name, "seed": seed, "n": len(y), "truth": float(y.mean()), **r}
            print(name, seed, f"prior {r['prior']:.3f} truth {y.mean():.3f} AUROC {np.mean(r['auroc']):.3f} "
                  f"(baseline {np.mean(r['baseline_auroc']):.3f})",
                  {w: (round(c["spread"], 3), round(c["f1"], 3)) for w, c in r["weights"].items()}, flush=True)
    res["seconds"] = time.time() - t0
    text = render(res)
    print(text)
    if not args.no_write:
        write_json(res, HERE / "results" / "calibrated_prior.json")
        write_results_md(text, key="calibrated-prior",
                         title="The calibrated rule with the guard's estimate as a prior (benchmarks/calibrated_prior.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
