"""How close can a label-free contamination estimate get on BeaverTails? Every estimator family we know, on the
strongest classifiers we have, against the shipped estimate in the same run.

    python benchmarks/estimate_ceiling.py [--seeds 0 1 2] [--fresh-pools T10 T30 B10 B30] [--layer 15]

The shipped estimate (`GuardScorer.contamination_estimate`: adjusted count of the packaged RBF guard's fold models
above the 0.85 quantile of their held-out harmful scores) overshoots on BeaverTails (issue 4's last target: within
0.05 of the truth on T and B). Here the guard's recipe (standardised RBF SVM, C 1, gamma 'scale', balanced) is
cross-validated on the guard's own 2306 rows (5 folds grouped by prompt) in two views: the sentence view alone,
and guard-model's view (sentence view + the model's hidden states at prompt_last and response_mean, layer 15). Each
fold model scores the pool; its held-out rows give the class-conditional scores the estimators assume the pool's
rows share. Estimators, averaged over the 5 fold models:
- adjusted count (Forman 2008) above the `level` quantile of held-out harmful scores, for several levels;
- HDy (Gonzalez-Castro et al. 2013): the mixture of the held-out harmful and safe score histograms (20 bins)
  closest to the pool's in Hellinger distance;
- EM (Saerens et al. 2002): prior-shift EM on the fold model's Platt-calibrated probabilities.
An estimator must be chosen without labels, so one setting has to hold on every pool: the table gives each one's
largest error on T, B and H. Pools as in pool_seeds.py (rows whose prompt the guard never saw): every pool at
seed 0, --fresh-pools at the other seeds (hidden states cached under benchmarks/.cache/seeds_all). The
decomposition table splits the adjusted count's error on each B draw into the part from the pool's safe rows
crossing the threshold more often than the held-out safe rows did, and the part from its harmful rows doing so:
both need labels to see. Rewrites the estimate-ceiling section of RESULTS.md and saves results/estimate_ceiling.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect import HERE, SEEDED_POOLS, write_results_md  # noqa: E402
from detect_plus import MODEL_GUARD_POSITIONS, guard_reference, guard_training_prompts  # noqa: E402
from pool_seeds import unseen_pool  # noqa: E402

from saft import GuardScorer, load_model  # noqa: E402
from saft.data import write_json  # noqa: E402
from saft.pipeline import versions  # noqa: E402
from saft.reference import reference_samples  # noqa: E402

LEVELS = (0.3, 0.5, 0.7, 0.85, 0.95)
SENTENCE_COLUMNS = 768


def fold_models(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> list[dict]:
    """The recipe fitted on 4/5 of the guard's rows, 5 times (folds grouped by prompt), each with its held-out
    scores and labels."""
    folds = []
    for train, test in GroupKFold(5).split(X, y, groups):
        model = make_pipeline(StandardScaler(), SVC(C=1.0, kernel="rbf", gamma="scale", class_weight="balanced"))
        model.fit(X[train], y[train])
        held_out = model.decision_function(X[test])
        platt = LogisticRegression().fit(held_out[:, None], y[test])
        folds.append({"model": model, "z": held_out, "y": y[test], "platt": platt})
    return folds


def adjusted_count(z: np.ndarray, fold: dict, level: float) -> tuple[float, dict]:
    """(estimate, the rates it assumed) above the `level` quantile of the fold's held-out harmful scores."""
    t = np.quantile(fold["z"][fold["y"] == 1], level)
    tpr, fpr = (fold["z"][fold["y"] == 1] > t).mean(), (fold["z"][fold["y"] == 0] > t).mean()
    return float(np.clip(((z > t).mean() - fpr) / (tpr - fpr), 0, 1)), {"t": t, "tpr": tpr, "fpr": fpr}


def hdy(z: np.ndarray, fold: dict, bins: int = 20) -> float:
    edges = np.quantile(fold["z"], np.linspace(0, 1, bins + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    hist = lambda v: np.histogram(v, edges)[0] / len(v)  # noqa: E731
    h, h1, h0 = hist(z), hist(fold["z"][fold["y"] == 1]), hist(fold["z"][fold["y"] == 0])
    return float(minimize_scalar(lambda p: -np.sum(np.sqrt(h * (p * h1 + (1 - p) * h0))), bounds=(0, 1),
                                 method="bounded").x)


def em(z: np.ndarray, fold: dict, iters: int = 500) -> float:
    post = fold["platt"].predict_proba(z[:, None])[:, 1]
    train = fold["y"].mean()
    p = train
    for _ in range(iters):
        a, b = post * p / train, (1 - post) * (1 - p) / (1 - train)
        p = float((a / (a + b)).mean())
    return p


def estimates(z_folds: list[np.ndarray], folds: list[dict]) -> dict:
    out = {f"adjusted count, level {level}": float(np.mean([adjusted_count(z, f, level)[0] for z, f in zip(z_folds, folds)]))
           for level in LEVELS}
    out["HDy"] = float(np.mean([hdy(z, f) for z, f in zip(z_folds, folds)]))
    out["EM"] = float(np.mean([em(z, f) for z, f in zip(z_folds, folds)]))
    return out


def decomposition(z_folds, folds, y: np.ndarray, level: float) -> dict:
    """The adjusted count's error (before clipping), split: safe rows' excess crossings, harmful rows' excess."""
    safe, harm = [], []
    for z, f in zip(z_folds, folds):
        _, r = adjusted_count(z, f, level)
        gap = r["tpr"] - r["fpr"]
        safe.append(((z[y == 0] > r["t"]).mean() - r["fpr"]) * (1 - y.mean()) / gap)
        harm.append(((z[y == 1] > r["t"]).mean() - r["tpr"]) * y.mean() / gap)
    return {"safe": float(np.mean(safe)), "harmful": float(np.mean(harm))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="label-free contamination estimators against the truth")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fresh-pools", nargs="+", default=["T10", "T30", "B10", "B30"], choices=list(SEEDED_POOLS))
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load_model(None, device="cpu")
    seen = guard_training_prompts(None)
    ref_X, ref_y = guard_reference(model, tok, layer=args.layer)
    groups = np.unique([s.prompt for s in reference_samples()], return_inverse=True)[1]
    views = {"sentence view": slice(0, SENTENCE_COLUMNS), "guard-model's view": slice(0, None)}
    folds = {v: fold_models(ref_X[:, cols], ref_y, groups) for v, cols in views.items()}
    guard = GuardScorer().load_weights()
    res = {"command": "python benchmarks/estimate_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "layer": args.layer, "seeds": args.seeds, "versions": versions(), "date": time.strftime("%Y-%m-%d"),
           "pools": {}}
    for seed in args.seeds:
        for name in SEEDED_POOLS if seed == 0 else args.fresh_pools:
            y, S, H, _ = unseen_pool(name, seed, model, tok, seen, layer=args.layer, positions=MODEL_GUARD_POSITIONS)
            X = np.hstack([S, H])
            row = {"pool": name, "seed": seed, "n": len(y), "truth": float(y.mean()),
                   "shipped": guard.contamination_estimate(S), "estimates": {}, "decomposition": {}}
            for v, cols in views.items():
                z_folds = [f["model"].decision_function(X[:, cols]) for f in folds[v]]
                row["estimates"][v] = estimates(z_folds, folds[v])
                row["decomposition"][v] = {str(level): decomposition(z_folds, folds[v], y, level) for level in LEVELS}
            res["pools"][f"{name} seed {seed}"] = row
            print(name, seed, f"truth {y.mean():.3f} shipped {row['shipped']:.3f}",
                  {k: round(e, 3) for k, e in row["estimates"]["guard-model's view"].items()}, flush=True)
    res["seconds"] = time.time() - t0
    write_json(res, HERE / "results" / "estimate_ceiling.json")
    text = render(res)
    print(text)
    if not args.no_write:
        write_results_md(text, key="estimate-ceiling",
                         title="Label-free contamination estimators on BeaverTails (benchmarks/estimate_ceiling.py)")
    return 0


def render(res: dict) -> str:
    rows = list(res["pools"].values())
    groups = {g: [r for r in rows if r["pool"].startswith(g)] for g in "TBH"}
    draws = {g: len(rs) for g, rs in groups.items()}
    lines = [f"Command: `{res['command']}`; layer {res['layer']}; rows whose prompt the guard never saw; draws: "
             + ", ".join(f"{g} {n}" for g, n in draws.items()) + f". Versions: {res['versions']}. Date: {res['date']}, "
             f"{res['seconds']:.0f} s. Cells: largest absolute error over the draws of each kind of pool (mean error "
             "in brackets); the target is 0.05 on T and B with one setting.", "",
             "| estimator | view | T | B | H | within 0.05 on T and B |", "|---|---|---|---|---|---|"]

    def cell(errs):
        return f"{max(np.abs(errs)):.3f} ({np.mean(errs):+.3f})" if errs else "—"

    def line(name, view, get):
        errs = {g: [get(r) - r["truth"] for r in rs] for g, rs in groups.items()}
        ok = max(np.abs(errs["T"] + errs["B"])) <= 0.05
        lines.append(f"| {name} | {view} | {cell(errs['T'])} | {cell(errs['B'])} | {cell(errs['H'])} | {'yes' if ok else 'no'} |")

    line("shipped: packaged RBF guard's fold models, level 0.85 (baseline)", "sentence view", lambda r: r["shipped"])
    for view in rows[0]["estimates"]:
        for name in rows[0]["estimates"][view]:
            line(name, view, lambda r, v=view, n=name: r["estimates"][v][n])
    lines += ["", "Adjusted count, guard-model's view: its error on each BeaverTails draw split into the part from safe "
              "rows crossing the threshold more often than the guard's held-out safe rows did and the part from "
              "harmful rows doing so (before clipping; means over the fold models). Each cell: safe / harmful.", "",
              "| pool | seed | truth | " + " | ".join(f"level {level}" for level in LEVELS) + " |",
              "|---|---|---|" + "---|" * len(LEVELS)]
    for r in groups["B"]:
        d = r["decomposition"]["guard-model's view"]
        lines.append(f"| {r['pool']} | {r['seed']} | {r['truth']:.3f} | "
                     + " | ".join(f"{d[str(level)]['safe']:+.3f} / {d[str(level)]['harmful']:+.3f}" for level in LEVELS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
