"""Detectors beyond the paper, on the same pools and cached features as benchmarks/detect.py.

Run detect.py first (it caches every layer and position of the pools); this script reads that cache and
computes the sentence-encoder view once (cached in the same folder). For each pool, position and detector it
reports AUROC, and for the selection rules F1 and the removed count over 5 label draws (mean, spread), the share
of safe refusals kept (T and H pools), and the label-free contamination estimate against the truth. Ceiling rows
train a logistic probe with every label (5-fold cross-validation) to show what the features hold at all; the
last ones add the guard's training rows, in the sentence view alone and (on the B pools) beside the model's
hidden states (of those rows too: about 15 minutes the first time, cached after). guard-model (label-free)
trains on those rows in its own view (sentence view + hidden states at prompt_last and response_mean), and
guard-model-probe (the labelled default) is guard-probe guided by it.
The guard detectors are scored only on the rows whose prompt the guard never saw in training ("unseen rows":
its BeaverTails prompts come from the judge half of the prompt split), so their pools are subsets, with their
own size and true contamination rate.

    python benchmarks/detect_plus.py [--layer 15]

Rewrites the section between the detect-plus markers in benchmarks/RESULTS.md and saves results/detect_plus.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect import HERE, LABEL_SEEDS, POOLS, fmt, pool_features, write_results_md  # noqa: E402

from saft import GuardScorer, ProbeScorer, SubspaceScorer, draw_labeled, get_detector, load_model, select_by_f1  # noqa: E402
from saft.encoders import sentence_features  # noqa: E402
from saft.data import write_json  # noqa: E402
from saft.features import POSITIONS  # noqa: E402
from saft.metrics import detection_metrics  # noqa: E402
from saft.pipeline import versions  # noqa: E402
from saft.pools import guard_training_rows, to_samples  # noqa: E402
from saft.reference import reference_samples  # noqa: E402
from saft.select import PRIOR_WEIGHT, select_calibrated, select_estimate, select_mixture, select_threshold  # noqa: E402


def f1_rule(scores_by_cand: dict, labels: list, seed: int) -> dict:
    idx = draw_labeled(labels, 100, seed=seed)
    sel = select_by_f1(scores_by_cand, {c: v[idx] for c, v in scores_by_cand.items()}, [labels[i] for i in idx])
    return sel


def ceiling_scores(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Out-of-fold scores of a standardised logistic probe trained on every label (5-fold CV)."""
    return cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)), X, y,
                             cv=5, method="decision_function")


def calibrated_rule(scores: np.ndarray, labels: list, seed: int, **prior):
    idx = draw_labeled(labels, 100, seed=seed)
    return select_calibrated(scores, scores[idx], [labels[i] for i in idx], **prior)


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
    rows["ceiling: probe on all labels (5-fold CV)"] = {"labels": len(y), "auroc": [float(roc_auc_score(y, ceiling_scores(X, y)))]}
    return rows


MODEL_GUARD_POSITIONS = ("prompt_last", "response_mean")  # guard-model's hidden-state blocks, as `saft filter` stacks them


def guard_training_prompts(raw_dir) -> set[str]:
    """Prompts the packaged guard was trained on: excluded from its evaluation."""
    return {r["prompt"] for r in guard_training_rows(raw_dir)}


def ceiling_with_guard_data(S: np.ndarray, y: np.ndarray, S_guard: np.ndarray, y_guard: np.ndarray, *,
                            kernel: str = "linear", standardize: bool = False) -> np.ndarray:
    """Out-of-fold scores (5-fold CV over the pool) of the guard's own recipe (`kernel` "linear": logistic
    regression; "rbf": the RBF support vector machine), trained on the guard's training rows plus every other
    fold's labelled pool rows: what the guard's data and all of the pool's labels together can reach in the view
    S (the sentence view, or with `standardize` one that adds the model's hidden states, whose columns would
    otherwise swamp the sentence view's)."""
    out = np.zeros(len(y))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(S, y):
        clf = (LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000) if kernel == "linear"
               else SVC(C=1.0, kernel="rbf", gamma="scale", class_weight="balanced"))
        clf = make_pipeline(StandardScaler(), clf) if standardize else clf
        out[test] = clf.fit(np.vstack([S_guard, S[train]]), np.concatenate([y_guard, y[train]])).decision_function(S[test])
    return out


def guard_reference(model, tok, *, layer: int = 15, positions: tuple[str, ...] = MODEL_GUARD_POSITIONS):
    """The guard's rows (`saft.reference`) in guard-model's view: sentence view, hidden states at `layer` and
    `positions` (every layer and position cached with detect.py's pools: 15 minutes the first time)."""
    samples = reference_samples()
    S = sentence_features(samples, cache_dir=HERE / ".cache" / "sentence", progress=False)
    feats = pool_features(model, tok, samples, max_length=512, cache=HERE / ".cache", progress=True)
    return np.hstack([S] + [feats.get(layer, p) for p in positions]), np.array([s.label for s in samples])


def unseen_pools(layers, position: str = "prompt_last", raw_dir=None) -> dict:
    """The pools of detect.py restricted to the rows whose prompt the guard never saw, from the cached features:
    pool name -> (labels, sentence view, {layer: hidden states at `position`})."""
    model, tok = load_model(None, device="cpu")
    seen = guard_training_prompts(raw_dir)
    pools = {}
    for name, build in POOLS.items():
        samples = build(1000, raw_dir)
        unseen = np.array([s.prompt not in seen for s in samples])
        feats = pool_features(model, tok, samples, max_length=512, cache=HERE / ".cache", progress=False)
        S = sentence_features(samples, cache_dir=HERE / ".cache" / "sentence")[unseen]
        pools[name] = (np.array([s.label for s in samples])[unseen], S,
                       {layer: feats.get(layer, position)[unseen] for layer in layers})
    return pools


def evaluate_guard(S: np.ndarray, labels: list, refusal: np.ndarray, hidden: dict, layer: int, reference=None) -> dict:
    """The guard on the sentence-encoder view: label-free rules, and the F1 rule on 100 labels for comparison;
    guard-knn and guard-student with the model's hidden states at `layer` (`hidden`: position -> matrix) as their
    second view; guard-model with those at MODEL_GUARD_POSITIONS, trained on `reference` (the guard's rows in
    that view, `guard_reference`), and guard-model-probe (guard-probe guided by guard-model) on 100 labels."""
    y = np.array(labels)
    guard = GuardScorer().fit(S)
    z = guard.score_samples(S)
    est = guard.contamination_estimate(S)
    z_linear = GuardScorer(kernel="linear").fit(S).score_samples(S)
    variants = [
        ("guard + estimate rule (label-free, default)", z, 0, lambda z, seed: select_estimate(z, estimate=est)),
        ("guard, linear kernel (before) + estimate rule (label-free)", z_linear, 0,
         lambda z, seed: select_estimate(z, estimate=est)),
        ("guard + flag rule (score > 0, label-free)", z, 0, lambda z, seed: select_threshold(z, threshold=0.0)),
        ("guard + F1 rule on 100 labels", z, 100, lambda z, seed: f1_rule({"guard": z}, labels, seed)),
    ]
    if reference is not None:
        view = np.hstack([S] + [hidden[p] for p in MODEL_GUARD_POSITIONS])
        zm = get_detector("guard-model").fit(view, reference_X=reference[0], reference_y=reference[1]).score_samples(view)
        variants.append((f"guard-model (layer {layer} {' + '.join(MODEL_GUARD_POSITIONS)}) + estimate rule (label-free)",
                         zm, 0, lambda z, seed: select_estimate(z, estimate=est)))

        @functools.lru_cache(maxsize=None)  # one fit per label draw, shared by the rows below
        def model_guided(seed):
            semi = np.full(len(y), -1)
            idx = draw_labeled(labels, 100, seed=seed)
            semi[idx] = y[idx]
            det = get_detector("guard-model-probe").fit(view, semi, reference_X=reference[0], reference_y=reference[1])
            return det.score_samples(view)

        name = f"guard-model-probe (layer {layer} {' + '.join(MODEL_GUARD_POSITIONS)}, 100 labels)"
        # The labelled default since session 8: its prior is guard-model's estimate, the packaged guard's (`est`).
        variants.append((f"{name} + calibrated rule", model_guided, 100,
                         lambda z, seed: calibrated_rule(z, labels, seed, prior=est, prior_weight=PRIOR_WEIGHT)))
        variants.append((f"{name} + F1 rule", model_guided, 100, lambda z, seed: f1_rule({"p": z}, labels, seed)))
    for pos, H in hidden.items():
        both = np.hstack([S, H])
        zk = get_detector("guard-knn").fit(both).score_samples(both)
        variants.append((f"guard-knn (layer {layer} {pos}) + estimate rule (label-free)", zk, 0,
                         lambda z, seed: select_estimate(z, estimate=est)))
        zt = get_detector("guard-student").fit(both).score_samples(both)
        variants.append((f"guard-student (layer {layer} {pos}) + estimate rule (label-free)", zt, 0,
                         lambda z, seed: select_estimate(z, estimate=est)))

        @functools.lru_cache(maxsize=None)  # one fit per label draw, shared by the rows below
        def guided(seed, both=both):
            semi = np.full(len(y), -1)
            idx = draw_labeled(labels, 100, seed=seed)
            semi[idx] = y[idx]
            return get_detector("guard-probe").fit(both, semi).score_samples(both)

        variants.append((f"guard-probe (layer {layer} {pos}, 100 labels) + F1 rule", guided, 100,
                         lambda z, seed: f1_rule({"guard-probe": z}, labels, seed)))
        # The default: the guard's label-free estimate (guard-probe's `label_free_estimate_with_se`, the same
        # as `est`) as the calibrated rule's prior.
        variants.append((f"guard-probe (layer {layer} {pos}, 100 labels) + calibrated rule", guided, 100,
                         lambda z, seed: calibrated_rule(z, labels, seed, prior=est, prior_weight=PRIOR_WEIGHT)))
        variants.append((f"guard-probe (layer {layer} {pos}, 100 labels) + calibrated rule without the prior (before)",
                         guided, 100, lambda z, seed: calibrated_rule(z, labels, seed)))
    rows = {}
    for name, z, n_labels, rule in variants:
        seeds = LABEL_SEEDS if n_labels else (0,)
        zs = [z(seed) if callable(z) else z for seed in seeds]  # scores that depend on the label draw
        sels = [rule(zz, seed) for zz, seed in zip(zs, seeds)]
        ms = [detection_metrics(zz, labels, sel.removed) for zz, sel in zip(zs, sels)]
        rows[name] = {"labels": n_labels, "auroc": [m["auroc"] for m in ms], "f1": [m["f1"] for m in ms],
                      "removed": [sel.n_removed for sel in sels], "n": len(y), "truth": float(y.mean()),
                      "refusals_kept": [float((~sel.removed[refusal]).mean()) for sel in sels] if refusal.any() else None,
                      "contamination_estimate": [sel.params["contamination_estimate"] for sel in sels]
                      if "contamination_estimate" in sels[0].params else None}
        if n_labels:
            # The harmful share among each draw's labelled rows: a removed count that follows the contamination
            # can move no less than this sampling noise does.
            rows[name]["labelled_harmful_share"] = [float(y[draw_labeled(labels, n_labels, seed=seed)].mean())
                                                    for seed in seeds]
    return rows


def render(res: dict) -> str:
    lines = [f"Command: `{res['command']}`  ", f"Features: layer {res['layer']} of the cached `detect.py` features "
             f"(same pools, seeds and model); label draws seeds {', '.join(map(str, LABEL_SEEDS))}.  ",
             f"Versions: {json.dumps(res['versions'])}  ", f"Date: {res['date']}, {res['seconds']:.0f} s.", "",
             "| pool | position | detector | labels | AUROC | F1 | removed (mean ± sd) | refusals kept | contamination est. (truth) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for pool, by_pos in res["pools"].items():
        for pos, rows in by_pos.items():
            for name, r in rows.items():
                truth = r.get("truth", res["truth"][pool])
                pool_name = f"{pool} ({r['n']} rows)" if "n" in r else pool
                rem = r.get("removed")
                cells = [pool_name, pos, name, str(r["labels"]), fmt(r["auroc"]),
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
    seen = guard_training_prompts(args.raw_dir)
    guard_rows = guard_training_rows(args.raw_dir)
    S_guard = sentence_features(to_samples(guard_rows, "guard"), cache_dir=Path(args.cache) / "sentence")
    # The model's hidden states of the guard's rows, for the ceilings (15 minutes the first time, then cached).
    guard_feats = pool_features(model, tok, to_samples(guard_rows, "guard"), max_length=512, cache=Path(args.cache),
                                progress=False)
    y_guard = np.array([r["harmful"] for r in guard_rows])
    reference = guard_reference(model, tok, layer=args.layer)  # the same rows, as guard-model reads them
    res = {"command": "python benchmarks/detect_plus.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "layer": args.layer, "versions": versions(), "date": time.strftime("%Y-%m-%d"), "pools": {}, "truth": {}}
    for name, build in POOLS.items():
        samples = build(args.n, args.raw_dir)
        labels = [s.label for s in samples]
        refusal = np.array([s.meta["source"] == "refusal" for s in samples])
        feats = pool_features(model, tok, samples, max_length=512, cache=Path(args.cache), progress=False)
        res["truth"][name] = float(np.mean(labels))
        res["pools"][name] = {pos: evaluate_pool(feats.get(args.layer, pos), labels, refusal) for pos in POSITIONS}
        # The guard is scored only on rows whose prompt it never saw in training (its pool is a subset).
        unseen = np.array([s.prompt not in seen for s in samples])
        S = sentence_features(samples, cache_dir=Path(args.cache) / "sentence")
        y_unseen = np.array(labels)[unseen]
        rows = evaluate_guard(S[unseen], list(y_unseen), refusal[unseen],
                              {pos: feats.get(args.layer, pos)[unseen] for pos in POSITIONS}, args.layer, reference)
        both = np.hstack([S, feats.get(args.layer, "response_mean")])[unseen]
        for view, F in [("sentence view", S[unseen]), (f"sentence view + layer {args.layer} response_mean", both)]:
            rows[f"ceiling: LR on all labels, {view} (5-fold CV)"] = {
                "labels": len(y_unseen), "n": len(y_unseen), "truth": float(y_unseen.mean()),
                "auroc": [float(roc_auc_score(y_unseen, ceiling_scores(F, y_unseen)))]}
        for kernel, clf in (("linear", "LR"), ("rbf", "RBF SVM")):
            rows[f"ceiling: the guard's training rows + {clf} on all labels, sentence view (5-fold CV)"] = {
                "labels": len(y_unseen), "n": len(y_unseen), "truth": float(y_unseen.mean()), "auroc": [float(roc_auc_score(
                    y_unseen, ceiling_with_guard_data(S[unseen], y_unseen, S_guard, y_guard, kernel=kernel)))]}
        # The same with the model's own hidden states of the guard's rows and of the pool beside the sentence view:
        # everything this benchmark has, trained on every label there is. On the B pools only, where the targets
        # are not met.
        for pos in ("prompt_last", "response_mean") if name.startswith("B") else ():
            F = np.hstack([S, feats.get(args.layer, pos)])[unseen]
            F_guard = np.hstack([S_guard, guard_feats.get(args.layer, pos)])
            for kernel, clf in (("linear", "LR"), ("rbf", "RBF SVM")):
                rows[f"ceiling: the guard's training rows + {clf} on all labels, sentence view + layer {args.layer} {pos}, "
                     "standardised (5-fold CV)"] = {
                    "labels": len(y_unseen), "n": len(y_unseen), "truth": float(y_unseen.mean()), "auroc": [float(roc_auc_score(
                        y_unseen, ceiling_with_guard_data(F, y_unseen, F_guard, y_guard, kernel=kernel, standardize=True)))]}
        res["pools"][name]["sentence view, unseen rows"] = rows
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
