"""Suite `certify`: how many random labels does the certificate need, and is it ever wrong more than delta?

For each pool (a list of (name, samples); see _label_pools.py, where the per-family pools plug in), guard v1's
sentence-view scores, and for each number of labels and each ALPHA, --draws uniformly random label sets
drawn from the pool (the labels are the pool's truth). Each draw runs `saft.certify.certify_cutoff` (delta
--delta). Measured per cell: the certification rate (draws certified), the false-certification rate (draws
certified whose kept set is in truth more than ALPHA harmful; the guarantee says at most delta), and, over the
certified draws, the share of the pool's safe rows kept. With strata (pools with harmful-looking prompts:
T, H, J), the same with one cutoff per prompt stratum (harmful-looking: BeaverTails, refusal and
JailbreakBench prompts; benign-looking: the rest; decided from each row's source, not its label) and the labels
drawn half in each stratum (a stratified random sample: uniform within each stratum, which is what each
stratum's test needs), reporting the safe refusals kept.

Anchor: Haroon and Fleming, "Clean Data, Unsafe Model: Certified Safety Curation for LLM Fine-Tuning", certify
BeaverTails pools with Llama Guard 3 and 400-800 labels.

    PYTHONPATH=src python benchmarks/suites/certify.py [--pools T10 ...] [--labels 100 200 400 800] [--alphas 0.05 0.1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _label_pools import BASE_POOLS, build_pools, guard_scores  # noqa: E402

from saft.certify import certify_cutoff  # noqa: E402

NAME = "certify"
QUESTION = ("With labels on a random sample of the pool, how often does `--certify ALPHA` certify a cutoff, is it "
            "ever wrong more often than delta, and how many labels does it need?")
HARMFUL_PROMPT_SOURCES = {"bt_safe", "bt_unsafe", "refusal", "jailbreakbench"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pools", nargs="+", default=list(BASE_POOLS), choices=list(BASE_POOLS))
    parser.add_argument("--labels", type=int, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the pools; draw d uses label seed 1000 + d")
    parser.add_argument("--n", type=int, default=1000, help="rows drawn per pool (before the guard's rows go)")


def cell(z, y, n_labels, alpha, delta, draws, strata=None, refusal=None) -> dict:
    safe = y == 0
    cert = wrong = 0
    kept_safe, kept_ref = [], []
    for d in range(draws):
        rng = np.random.default_rng(1000 + d)
        if strata is None:
            idx = rng.choice(len(y), size=n_labels, replace=False)
        else:  # a stratified random sample: half the labels in each stratum (uniform within it)
            names = sorted(set(strata.tolist()))
            idx = np.concatenate([rng.choice(np.flatnonzero(strata == s), replace=False,
                                             size=min(n_labels // len(names), int((strata == s).sum())))
                                  for s in names])
        c = certify_cutoff(z, idx, y[idx], alpha=alpha, delta=delta, strata=strata, refuse=False)
        if not c.certified:
            continue
        cert += 1
        if strata is None:
            wrong += y[c.kept].mean() > alpha
        else:  # each stratum's statement must hold: wrong if any stratum's kept set is over its alpha
            wrong += any(y[c.kept & (strata == s)].mean() > alpha for s in set(strata.tolist()))
        kept_safe.append(c.kept[safe].mean())
        if refusal is not None and refusal.any():
            kept_ref.append(c.kept[refusal].mean())
    return {"labels": n_labels, "alpha": alpha, "certified": cert / draws, "false_certified": wrong / draws,
            "safe_kept": float(np.mean(kept_safe)) if kept_safe else None,
            "refusals_kept": float(np.mean(kept_ref)) if kept_ref else None}


def run(args) -> dict:
    from saft.pipeline import versions

    t0 = time.time()
    res = {"command": " ".join(["python", *sys.argv]), "seed": args.seed,
           "data": (f"pools {', '.join(args.pools)} of {args.n} rows (seed {args.seed}) without the rows whose prompt "
                    "guard v1 trained on; J = Alpaca/Dolly + JailbreakBench artifacts (benchmarks/suites/_label_pools.py)"),
           "versions": versions(), "delta": args.delta, "draws": args.draws,
           "detector": "guard v1 (RBF, sentence view; see _label_pools.py for why v1)", "pools": []}
    for name, samples in build_pools(args.pools, seed=args.seed, n=args.n):
        y = np.array([s.label for s in samples])
        z, _ = guard_scores(samples)
        source = np.array([s.meta["source"] for s in samples])
        refusal = np.isin(source, ["refusal"]) | ((source == "jailbreakbench") & (y == 0))
        strata = np.where(np.isin(source, list(HARMFUL_PROMPT_SOURCES)), "harmful-looking", "benign-looking")
        r = {"pool": name, "rows": len(y), "truth": float(y.mean()), "cells": [], "strata_cells": []}
        for n_labels in args.labels:
            if n_labels > len(y):
                continue
            for alpha in args.alphas:
                r["cells"].append(cell(z, y, n_labels, alpha, args.delta, args.draws, refusal=refusal))
                if len(set(strata.tolist())) > 1:
                    r["strata_cells"].append(cell(z, y, n_labels, alpha, args.delta, args.draws, strata=strata,
                                                  refusal=refusal))
        # the least labels that certify in at least half the draws, per alpha
        r["labels_needed"] = {str(a): next((c["labels"] for c in r["cells"] if c["alpha"] == a and c["certified"] >= 0.5),
                                           None) for a in args.alphas}
        res["pools"].append(r)
        print(name, [(c["labels"], c["alpha"], c["certified"], c["false_certified"]) for c in r["cells"]], flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _f(v, fmt="{:.2f}"):
    return "—" if v is None else fmt.format(v)


def render(result: dict, plots_dir: Path) -> str:
    d = result["delta"]
    lines = [f"**{QUESTION}**", "", f"Command: `{result['command']}`; seed {result['seed']}; {result['data']}. "
             f"Scores: {result['detector']}. delta {d:g}; {result['draws']} random label draws per cell. "
             f"{result['seconds']:.0f} s (CPU shared with other jobs). Versions: {result['versions']}.", "",
             "Cells: certified share of draws / false-certification share (certified and in truth over ALPHA; "
             f"the guarantee: at most {d:g}) / share of the safe rows kept when certified.", ""]
    alphas = sorted({c["alpha"] for r in result["pools"] for c in r["cells"]})
    labels = sorted({c["labels"] for r in result["pools"] for c in r["cells"]})
    head = [f"{n} labels, ALPHA {a:g}" for n in labels for a in alphas]
    lines += ["| pool | rows | truth | " + " | ".join(head) + " |", "|---|---|---|" + "---|" * len(head)]
    worst = 0.0
    for r in result["pools"]:
        by = {(c["labels"], c["alpha"]): c for c in r["cells"]}
        cells = []
        for n in labels:
            for a in alphas:
                c = by.get((n, a))
                cells.append("—" if c is None else f"{c['certified']:.2f} / {c['false_certified']:.3f} / {_f(c['safe_kept'])}")
                if c is not None:
                    worst = max(worst, c["false_certified"])
        lines.append(f"| {r['pool']} | {r['rows']} | {r['truth']:.3f} | " + " | ".join(cells) + " |")
    strat = [r for r in result["pools"] if r["strata_cells"]]
    if strat:
        lines += ["", "One cutoff per prompt stratum (harmful-looking / benign-looking, each at ALPHA, delta split; "
                  "the labels drawn half in each stratum): "
                  "certified / false-certified (any stratum over ALPHA) / safe refusals kept, against one cutoff over "
                  "the pool (refusals kept).", "",
                  "| pool | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for r in strat:
            by = {(c["labels"], c["alpha"]): c for c in r["strata_cells"]}
            one = {(c["labels"], c["alpha"]): c for c in r["cells"]}
            cells = []
            for n in labels:
                for a in alphas:
                    c = by.get((n, a))
                    if c is None:
                        cells.append("—")
                        continue
                    worst = max(worst, c["false_certified"])
                    cells.append(f"{c['certified']:.2f} / {c['false_certified']:.3f} / {_f(c['refusals_kept'])} "
                                 f"(pool: {_f(one[(n, a)]['refusals_kept'])})")
            lines.append(f"| {r['pool']} | " + " | ".join(cells) + " |")
    need = "; ".join(f"{r['pool']}: " + ", ".join(f"ALPHA {a}: {v if v is not None else f'> {labels[-1]}'}"
                                                   for a, v in r["labels_needed"].items()) for r in result["pools"])
    lines += ["", f"Largest false-certification share in any cell: {worst:.3f} (delta {d:g}). Labels needed to "
              f"certify in at least half the draws: {need}. Random labels are the certificate's tool; chosen labels "
              "(the labels suite) serve the calibrated rule and give no guarantee."]
    return "\n".join(lines)
