"""Detectors beyond the paper, on the same pools and cached features as benchmarks/detect.py.

Run detect.py first (it caches every layer and position of the four pools); this script then only reads the
cache. For each pool, position and detector it reports AUROC, and for the selection rules F1 and the removed
count over 5 label draws (mean, spread), the share of safe refusals kept (T pools), and the label-free
mixture rule's contamination estimate against the truth. A ceiling row trains a probe with every label
(5-fold cross-validation) to show what the model's features hold at all.

    python benchmarks/detect_plus.py [--layer 15]

Rewrites the section between the detect-plus markers in benchmarks/RESULTS.md and saves results/detect_plus.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect import HERE, LABEL_SEEDS, POOLS, fmt, pool_features, write_results_md  # noqa: E402

from saft import ProbeScorer, SubspaceScorer, draw_labeled, load_model, select_by_f1  # noqa: E402
from saft.data import write_json  # noqa: E402
from saft.features import POSITIONS  # noqa: E402
from saft.metrics import detection_metrics  # noqa: E402
from saft.pipeline import versions  # noqa: E402
from saft.select import select_mixture  # noqa: E402


def f1_rule(scores_by_cand: dict, labels: list, seed: int) -> dict:
    idx = draw_labeled(labels, 100, seed=seed)
    sel = select_by_f1(scores_by_cand, {c: v[idx] for c, v in scores_by_cand.items()}, [labels[i] for i in idx])
    return sel


def evaluate_pool(X: np.ndarray, labels: list, refusal: np.ndarray) -> dict:
    """Every detector variant on one feature matrix."""
    y = np.array(labels)
    rows = {}

    def record(name, labels_used, scores_fn, rule):
        aucs, f1s, removed, kept_ref, est = [], [], [], [], []
        for seed in LABEL_SEEDS if labels_used else (0,):
            scores = scores_fn(seed)
            sel = rule(scores, seed)
            s = scores if not isinstance(scores, dict) else scores[sel.params["candidate"]]
            m = detection_metrics(s, labels, sel.removed)
            aucs.append(m["auroc"])
            f1s.append(m["f1"])
            removed.append(sel.n_removed)
            if refusal.any():
                kept_ref.append(float((~sel.removed[refusal]).mean()))
            if "contamination_estimate" in sel.params:
                est.append(sel.params["contamination_estimate"])
        rows[name] = {"labels": labels_used, "auroc": aucs, "f1": f1s, "removed": removed,
                      "refusals_kept": kept_ref or None, "contamination_estimate": est or None}

    paper = lambda seed: {k: SubspaceScorer(n_components=k).fit(X).score_samples(X) for k in (1, 2, 3, 4)}  # noqa: E731
    std = lambda seed: SubspaceScorer(n_components=1, standardize=True).fit(X).score_samples(X)  # noqa: E731

    def probe(seed):
        semi = np.full(len(y), -1)
        idx = draw_labeled(labels, 100, seed=seed)
        semi[idx] = y[idx]
        return ProbeScorer().fit(X, semi).score_samples(X)

    record("paper: subspace, k and tau by F1 on 100 labels", 100, paper, lambda s, seed: f1_rule(s, labels, seed))
    record("subspace k=1 + mixture rule (label-free)", 0, lambda seed: paper(seed)[1], lambda s, seed: select_mixture(s))
    record("standardised subspace k=1 + mixture rule (label-free)", 0, std, lambda s, seed: select_mixture(s))
    record("probe (PCA 32 of the pool + 100 labels) + F1 rule", 100, probe,
           lambda s, seed: f1_rule({"probe": s}, labels, seed))
    ceiling = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)), X, y,
                                cv=5, method="decision_function")
    rows["ceiling: probe on all labels (5-fold CV)"] = {"labels": len(y), "auroc": [float(roc_auc_score(y, ceiling))]}
    return rows


def render(res: dict) -> str:
    lines = [f"Command: `{res['command']}`  ", f"Features: layer {res['layer']} of the cached `detect.py` features "
             f"(same pools, seeds and model); label draws seeds {', '.join(map(str, LABEL_SEEDS))}.  ",
             f"Versions: {json.dumps(res['versions'])}  ", f"Date: {res['date']}, {res['seconds']:.0f} s.", "",
             "| pool | position | detector | labels | AUROC | F1 | removed (mean ± sd) | refusals kept | contamination est. (truth) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for pool, by_pos in res["pools"].items():
        truth = res["truth"][pool]
        for pos, rows in by_pos.items():
            for name, r in rows.items():
                rem = r.get("removed")
                cells = [pool, pos, name, str(r["labels"]), fmt(r["auroc"]),
                         fmt(r["f1"]) if r.get("f1") else "—",
                         f"{np.mean(rem):.0f} ± {np.std(rem):.0f}" if rem else "—",
                         fmt(r["refusals_kept"]) if r.get("refusals_kept") else "—",
                         f"{np.mean(r['contamination_estimate']):.3f} ({truth:.2f})" if r.get("contamination_estimate") else "—"]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="detectors beyond the paper")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--raw-dir", default=None)
    ap.add_argument("--cache", default=str(HERE / ".cache"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load_model(None, device="cpu")
    res = {"command": "python benchmarks/detect_plus.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "layer": args.layer, "versions": versions(), "date": time.strftime("%Y-%m-%d"), "pools": {}, "truth": {}}
    for name, build in POOLS.items():
        samples = build(args.n, args.raw_dir)
        labels = [s.label for s in samples]
        refusal = np.array([s.meta["source"] == "refusal" for s in samples])
        feats = pool_features(model, tok, samples, max_length=512, cache=Path(args.cache), progress=False)
        res["truth"][name] = float(np.mean(labels))
        res["pools"][name] = {pos: evaluate_pool(feats.get(args.layer, pos), labels, refusal) for pos in POSITIONS}
        for pos, rows in res["pools"][name].items():
            for det, r in rows.items():
                print(f"{name} {pos:13s} {det}: AUROC {fmt(r['auroc'])}", flush=True)
    res["seconds"] = time.time() - t0
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        write_json(res, HERE / "results" / "detect_plus.json")
        write_results_md(render(res), key="detect-plus", title="Detection beyond the paper (benchmarks/detect_plus.py)")
        print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
