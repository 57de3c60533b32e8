"""Suite `labels`: do 30 chosen labels fix the removed count better than 100 random ones?

For each pool (a list of (name, samples); see _label_pools.py, where the per-family pools plug in), guard v1's
sentence-view scores and its label-free estimate (the prior) go through `select_calibrated` (prior worth
100 labels, weighted by its agreement with the labels) with labels from the pool's own truth on:
- 30 rows chosen by `saft.label.choose_rows` (the `saft label` default), over --draws seeds of its random pick
  inside each stratum;
- 30 chosen rows spread over the ranks only (focus 0: no rows around the estimate's cutoff), the ablation;
- 30 chosen rows with the prior at its fixed weight (test_level 0), the rule without the agreement test;
- 30 chosen rows fitted with sklearn's default Platt penalty (C 1), and 30 chosen / 100 random rows cut at the
  expected-F1 optimum instead of the estimated count (`cut="f1"`): the choices the rule made;
- 30 and 100 uniformly random rows, over --draws seeds;
- no labels: the guard's estimate alone (the `estimate` rule).
Measured: the removal-count error |removed - harmful| / rows (mean and worst over the draws), the F1 of the
removal against the truth, and the error of the contamination estimate. Target: chosen 30 at most 0.03 and
below random 100 on every pool.

    PYTHONPATH=src python benchmarks/suites/labels.py [--pools T10 ...] [--draws 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _label_pools import BASE_POOLS, build_pools, calibrated_draws, guard_scores  # noqa: E402

from saft.label import choose_rows  # noqa: E402
from saft.detectors.base import ContaminationEstimate  # noqa: E402
from saft.select import PRIOR_WEIGHT, select_estimate  # noqa: E402

NAME = "labels"
QUESTION = ("Do 30 labels chosen by `saft label` pin down the removed count (error <= 0.03 of the pool) better "
            "than 100 random labels, on every pool?")
ARMS = ("chosen 30", "chosen 30, spread only", "chosen 30, focus 0.75", "chosen 30, fixed prior weight",
        "chosen 30, Platt C 1", "chosen 30, expected-F1 cut", "random 30", "random 100", "random 100, Platt C 1",
        "random 100, expected-F1 cut", "no labels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pools", nargs="+", default=list(BASE_POOLS), choices=list(BASE_POOLS))
    parser.add_argument("--draws", type=int, default=20, help="seeds of each labelled arm")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pools")
    parser.add_argument("--n", type=int, default=1000, help="rows drawn per pool (before the guard's rows go)")


def arm_rows(arm: str, z: np.ndarray, prior: float, seed: int) -> tuple[np.ndarray, dict]:
    if arm == "chosen 30":
        return choose_rows(z, n=30, estimate=prior, seed=seed), {}
    if arm == "chosen 30, spread only":
        return choose_rows(z, n=30, seed=seed), {}
    if arm == "chosen 30, focus 0.75":
        return choose_rows(z, n=30, estimate=prior, focus=0.75, seed=seed), {}
    if arm == "chosen 30, fixed prior weight":
        return choose_rows(z, n=30, estimate=prior, seed=seed), {"test_level": 0.0}
    if arm == "chosen 30, Platt C 1":
        return choose_rows(z, n=30, estimate=prior, seed=seed), {"platt_c": 1.0}
    if arm == "chosen 30, expected-F1 cut":
        return choose_rows(z, n=30, estimate=prior, seed=seed), {"cut": "f1"}
    if arm == "random 100, Platt C 1":
        return np.random.default_rng(seed).choice(len(z), size=100, replace=False), {"platt_c": 1.0}
    if arm == "random 100, expected-F1 cut":
        return np.random.default_rng(seed).choice(len(z), size=100, replace=False), {"cut": "f1"}
    k = int(arm.split()[1])
    return np.random.default_rng(seed).choice(len(z), size=k, replace=False), {}


def evaluate_pool(name: str, samples, *, draws: int) -> dict:
    y = np.array([s.label for s in samples])
    z, prior = guard_scores(samples)
    n, truth = len(y), float(y.mean())
    out = {"pool": name, "rows": n, "truth": truth, "prior": prior, "arms": {}}
    for arm in ARMS:
        if arm == "no labels":
            sel = select_estimate(z, estimate=ContaminationEstimate(prior))
            err = abs(sel.n_removed - y.sum()) / n
            out["arms"][arm] = {"count_error": err, "count_error_max": err, "draws": 1, "refused": 0,
                                "estimate_error": abs(sel.params["contamination_estimate"] - truth),
                                "f1": float(f1_score(y, sel.removed, zero_division=0))}
        else:
            out["arms"][arm] = calibrated_draws(z, y, prior, lambda seed: arm_rows(arm, z, prior, seed), draws=draws)
    a = out["arms"]
    c, r = a["chosen 30"], a["random 100"]
    out["meets_target"] = bool(c["count_error"] is not None and c["count_error"] <= 0.03
                               and c["count_error"] < r["count_error"])
    return out


def run(args) -> dict:
    from saft.pipeline import versions

    t0 = time.time()
    pools = build_pools(args.pools, seed=args.seed, n=args.n)
    res = {"command": " ".join(["python", *sys.argv]), "seed": args.seed,
           "data": (f"pools {', '.join(args.pools)} of {args.n} rows (seed {args.seed}) without the rows whose prompt "
                    "guard v1 trained on; J = Alpaca/Dolly + JailbreakBench artifacts (benchmarks/suites/_label_pools.py)"),
           "versions": versions(), "draws": args.draws, "prior_weight": PRIOR_WEIGHT,
           "detector": "guard v1 (RBF, sentence view; see _label_pools.py for why v1); prior: its label-free estimate", "pools": []}
    for name, samples in pools:
        r = evaluate_pool(name, samples, draws=args.draws)
        res["pools"].append(r)
        print(name, {k: v["count_error"] for k, v in r["arms"].items()}, flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _cell(c: dict) -> str:
    if c["count_error"] is None:
        return "refused"
    extra = f" ({c['refused']} refused)" if c["refused"] else ""
    return f"{c['count_error']:.3f} / {c['count_error_max']:.3f} / {c['f1']:.2f}{extra}"


def render(result: dict, plots_dir: Path) -> str:
    cpu = result.get("cpu_note", "CPU use by other jobs not recorded")
    lines = [f"**{QUESTION}**", "", f"Command: `{result['command']}`; seed {result['seed']}; {result['data']}. "
             f"Scores: {result['detector']}; calibrated rule with the prior worth {result['prior_weight']:g} labels. "
             f"{result['draws']} draws per labelled arm. {result['seconds']:.0f} s ({cpu}). "
             f"Versions: {result['versions']}.", "",
             "Cells: removal-count error |removed - harmful| / rows, mean / worst over the draws (the chosen rows "
             "differ by the random pick inside each stratum) / mean F1 of the removal against the truth. The "
             "calibrated rule removes its estimated harmful count; the expected-F1 arms cut where the F1 expected "
             "under the calibrated probabilities peaks instead.", "",
             "| pool | rows | truth | guard estimate | " + " | ".join(ARMS) + " | target met |",
             "|---|---|---|---|" + "---|" * len(ARMS) + "---|"]
    for r in result["pools"]:
        lines.append(f"| {r['pool']} | {r['rows']} | {r['truth']:.3f} | {r['prior']:.3f} | "
                     + " | ".join(_cell(r["arms"][a]) for a in ARMS) + f" | {'yes' if r['meets_target'] else 'no'} |")
    pools = result["pools"]
    met = [r["pool"] for r in pools if r["meets_target"]]
    ratio = [r["arms"]["chosen 30"]["count_error"] / max(r["arms"]["random 100"]["count_error"], 1e-9)
             for r in pools if r["arms"]["chosen 30"]["count_error"] is not None]
    cut = "chosen 30, expected-F1 cut"
    both = [r for r in pools if r["arms"]["chosen 30"]["f1"] is not None and r["arms"][cut]["f1"] is not None]
    f1_better = sum(r["arms"]["chosen 30"]["f1"] > r["arms"][cut]["f1"] + 0.005 for r in both)
    f1_worse = sum(r["arms"]["chosen 30"]["f1"] < r["arms"][cut]["f1"] - 0.005 for r in both)
    lines += ["", f"Chosen 30 meets the target (<= 0.03 and below random 100) on {len(met)} of {len(pools)} "
              f"pools ({', '.join(met) or 'none'}); its error is {np.mean(ratio):.2f} times random 100's on average "
              f"(range {min(ratio):.2f}-{max(ratio):.2f}). Against the expected-F1 cut on the same labels, the "
              f"estimated count's F1 is higher on {f1_better}, lower on {f1_worse} and within 0.005 on "
              f"{len(both) - f1_better - f1_worse} of {len(both)} pools. Chosen labels are for the calibrated "
              "rule's removed count; they carry no guarantee (that needs a random sample: the certify suite)."]
    return "\n".join(lines)
