"""The label-free detectors on fresh draws of every pool: does the ranking hold beyond the pools of seed 0?

    python benchmarks/pool_seeds.py [--seeds 0 1 2] [--fresh-pools T10 ... H30] [--layer 15]

Pools T10..H30 as in detect.py, drawn with each seed, on the rows whose prompt the guard never saw. Hidden
states of one layer (seed 0: detect.py's cache; other seeds: that layer at every position, computed once and
cached under benchmarks/.cache/seeds_all), the sentence view as everywhere. For
guard, guard-knn and guard-student, each with the guard's RBF classifier (the default) and with its linear one
(the default before), at prompt_last; and guard-model at prompt_last and response_mean, trained on the guard's
rows in that view (their hidden states are cached with detect.py's pools): AUROC, and F1 and the removed count
under the estimate rule (the label-free default rule). guard-student, the label-free default before guard-model,
is the baseline of the same run; the summary gives each detector's mean AUROC and F1 change against it.
Rewrites the pool-seeds section of RESULTS.md and saves results/pool_seeds.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect import HERE, SEEDED_POOLS, pool_features, write_results_md  # noqa: E402
from detect_plus import MODEL_GUARD_POSITIONS, guard_reference, guard_training_prompts  # noqa: E402

from saft import extract_features, get_detector, load_model  # noqa: E402
from saft.data import write_json  # noqa: E402
from saft.detectors import own_estimate  # noqa: E402
from saft.encoders import sentence_features  # noqa: E402
from saft.features import POSITIONS  # noqa: E402
from saft.metrics import detection_metrics  # noqa: E402
from saft.pipeline import versions  # noqa: E402
from saft.select import select_estimate  # noqa: E402

# row name -> (registered detector, its parameters)
DETECTORS = {name + suffix: (name, params) for suffix, params in (("", {}), (" (linear)", {"kernel": "linear"}))
             for name in ("guard", "guard-knn", "guard-student")}
DETECTORS["guard-model"] = ("guard-model", {})
BASELINE = "guard-student"


def unseen_pool(name: str, seed: int, model, tok, seen: set[str], *, layer: int = 15, n: int = 1000,
                positions: tuple[str, ...] = ("prompt_last",)):
    """Pool `name` drawn with `seed`, restricted to the rows whose prompt the guard never saw: (labels, sentence
    view, hidden states at `layer` and `positions` side by side, safe-refusal mask). Seed 0 reads detect.py's
    cache (every layer); other seeds compute `layer` at every position once (one forward pass that stops there),
    cached under benchmarks/.cache/seeds_all."""
    samples = SEEDED_POOLS[name](n, seed)
    unseen = np.array([s.prompt not in seen for s in samples])
    y = np.array([s.label for s in samples])[unseen]
    refusal = np.array([s.meta["source"] == "refusal" for s in samples])[unseen]
    S = sentence_features(samples, cache_dir=HERE / ".cache" / "sentence", progress=False)[unseen]
    if seed == 0:
        feats = pool_features(model, tok, samples, max_length=512, cache=HERE / ".cache", progress=True)
    else:
        feats = extract_features(model, tok, samples, layers=[layer], positions=list(POSITIONS), max_length=512,
                                 batch_size=8, cache_dir=HERE / ".cache" / "seeds_all", progress=True)
    return y, S, np.hstack([feats.get(layer, p) for p in positions])[unseen], refusal


def evaluate(y: np.ndarray, S: np.ndarray, H: np.ndarray, reference: tuple) -> dict:
    """Every detector of DETECTORS on one pool; H holds the hidden states at MODEL_GUARD_POSITIONS side by side
    (the others read the first, prompt_last), `reference` the guard's rows in guard-model's view."""
    out = {}
    for name, (detector, params) in DETECTORS.items():
        if detector == "guard-model":
            X = np.hstack([S, H])
            det = get_detector(detector, **params).fit(X, reference_X=reference[0], reference_y=reference[1])
        else:
            X = S if detector == "guard" else np.hstack([S, H[:, :H.shape[1] // len(MODEL_GUARD_POSITIONS)]])
            det = get_detector(detector, **params).fit(X)
        scores = det.score_samples(X)
        sel = select_estimate(scores, **own_estimate(det, X))
        m = detection_metrics(scores, y.tolist(), sel.removed)
        out[name] = {"auroc": m["auroc"], "f1": m["f1"], "removed": sel.n_removed,
                     "estimate": sel.params["contamination_estimate"]}
    return out


def render(res: dict) -> str:
    lines = [f"Command: `{res['command']}`; layer {res['layer']} prompt_last; rows whose prompt the guard never saw; "
             f"estimate rule. Versions: {res['versions']}. Date: {res['date']}, {res['seconds']:.0f} s.", "",
             "| pool | seed | rows | harmful | " + " | ".join(f"{d} AUROC" for d in DETECTORS) + " | "
             + " | ".join(f"{d} F1 (removed)" for d in DETECTORS) + " |", "|---|---|---|---|" + "---|" * 2 * len(DETECTORS)]
    for key, r in res["pools"].items():
        d = r["detectors"]
        lines.append(f"| {r['pool']} | {r['seed']} | {r['n']} | {r['n_harmful']} | "
                     + " | ".join(f"{d[x]['auroc']:.3f}" for x in DETECTORS) + " | "
                     + " | ".join(f"{d[x]['f1']:.3f} ({d[x]['removed']})" for x in DETECTORS) + " |")
    lines += ["", f"Mean change against {BASELINE} (same run), over every pool and seed, and the pools where the "
              "detector's AUROC is below the baseline's:", "", "| detector | mean AUROC change | mean F1 change | AUROC below baseline |",
              "|---|---|---|---|"]
    rows = list(res["pools"].values())
    for x in DETECTORS:
        da = [r["detectors"][x]["auroc"] - r["detectors"][BASELINE]["auroc"] for r in rows]
        df = [r["detectors"][x]["f1"] - r["detectors"][BASELINE]["f1"] for r in rows]
        below = [f"{r['pool']}/{r['seed']}" for r, d in zip(rows, da) if d < 0]
        lines.append(f"| {x} | {np.mean(da):+.3f} | {np.mean(df):+.3f} | {', '.join(below) or 'none'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="label-free detectors on fresh pool draws")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fresh-pools", nargs="+", default=list(SEEDED_POOLS), choices=list(SEEDED_POOLS),
                    help="pools drawn for the seeds other than 0 (seed 0: every pool)")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load_model(None, device="cpu")
    seen = guard_training_prompts(None)
    res = {"command": "python benchmarks/pool_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "layer": args.layer, "seeds": args.seeds, "versions": versions(), "date": time.strftime("%Y-%m-%d"), "pools": {}}
    reference = guard_reference(model, tok, layer=args.layer)
    for seed in args.seeds:
        for name in SEEDED_POOLS if seed == 0 else args.fresh_pools:
            y, S, H, _ = unseen_pool(name, seed, model, tok, seen, layer=args.layer, n=args.n,
                                     positions=MODEL_GUARD_POSITIONS)
            res["pools"][f"{name} seed {seed}"] = {"pool": name, "seed": seed, "n": len(y), "n_harmful": int(y.sum()),
                                                   "detectors": evaluate(y, S, H, reference)}
            print(name, seed, {d: round(v["auroc"], 3) for d, v in res["pools"][f"{name} seed {seed}"]["detectors"].items()}, flush=True)
    res["seconds"] = time.time() - t0
    text = render(res)
    print(text)
    if not args.no_write:
        write_json(res, HERE / "results" / "pool_seeds.json")
        write_results_md(text, key="pool-seeds", title="Label-free detectors on fresh pool draws (benchmarks/pool_seeds.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
