"""The detection targets of issue 4, checked against benchmarks/results/detect_plus.json, estimate.json,
pool_seeds.json and calibrated_prior.json.

    python benchmarks/targets.py

Reads the results of `benchmarks/detect_plus.py`, `benchmarks/estimate.py`, `benchmarks/pool_seeds.py` and
`benchmarks/calibrated_prior.py` (run them first; the label-free AUROC targets count as met only if they hold on
every pool seed of pool_seeds, the stability target only if it holds on calibrated_prior's fresh draws), prints each
target with the value reached by the default detectors and the best row of the benchmark, and rewrites the
targets section of RESULTS.md. Nothing here is typed in by hand: every number is looked up in the results files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect import HERE, write_results_md  # noqa: E402

from saft.select import PRIOR_WEIGHT  # noqa: E402

LABEL_FREE_DEFAULT = "guard-model (layer {layer} prompt_last + response_mean) + estimate rule (label-free)"
LABEL_FREE_NAME = "guard-model"  # the same detector in pool_seeds.json (saft.pipeline.LABEL_FREE)
LABELLED_DEFAULT = "guard-probe (layer {layer} prompt_last, 100 labels) + calibrated rule"  # with the guard's prior
GUARD_VIEW = "sentence view, unseen rows"


def rows(res: dict, pool: str):
    """(position, name, row) for every detector row of a pool."""
    for pos, by_name in res["pools"][pool].items():
        for name, r in by_name.items():
            yield pos, name, r


def best(res: dict, pool: str, ok) -> tuple[float, str]:
    cands = [(float(np.mean(r["auroc"])), f"{name} [{pos}]") for pos, name, r in rows(res, pool) if ok(name, r)]
    return max(cands) if cands else (float("nan"), "—")


def _weight_key(res: dict, weight: float) -> str:
    """The key of `weight` in calibrated_prior.json's per-pool results (the benchmark must have run it)."""
    for w in res["weights"]:
        if float(w) == float(weight):
            return str(w)
    raise SystemExit(f"benchmarks/results/calibrated_prior.json has no row for the default prior weight {weight}; "
                     "rerun benchmarks/calibrated_prior.py with it among --weights")


def check(res: dict) -> list[dict]:
    layer = res["layer"]
    free, lab = LABEL_FREE_DEFAULT.format(layer=layer), LABELLED_DEFAULT.format(layer=layer)
    pools = list(res["pools"])
    T, B = [p for p in pools if p.startswith("T")], [p for p in pools if p.startswith("B")]
    get = lambda p, name: res["pools"][p][GUARD_VIEW][name]  # noqa: E731
    auc = lambda p, name: float(np.mean(get(p, name)["auroc"]))  # noqa: E731
    out = []
    label_free = lambda name, r: r["labels"] == 0  # noqa: E731
    # Fresh draws of every pool (benchmarks/pool_seeds.py): the label-free default must hold on each of them.
    seeds_file = HERE / "results" / "pool_seeds.json"
    drawn = list(json.loads(seeds_file.read_text())["pools"].values()) if seeds_file.exists() else []
    for group, bar in ((T, 0.95), (B, 0.80)):
        vals = {p: auc(p, free) for p in group}
        per_seed = {p: {r["seed"]: r["detectors"][LABEL_FREE_NAME]["auroc"] for r in drawn if r["pool"] == p} for p in group}
        bests = {p: best(res, p, label_free) for p in group}
        seeds_text = ("; over pool seeds (pool_seeds.py): " + ", ".join(
            f"{p} " + " / ".join(f"{v:.3f}" for _, v in sorted(per_seed[p].items())) for p in group)
            + f" (seeds {', '.join(map(str, sorted({r['seed'] for r in drawn})))})") if drawn else ""
        met = all(v >= bar for v in vals.values()) and all(v >= bar for s in per_seed.values() for v in s.values())
        out.append({"target": f"label-free AUROC >= {bar} on {'/'.join(group)}", "met": met,
                    "default": ", ".join(f"{p} {v:.3f}" for p, v in vals.items()) + seeds_text,
                    "best": ", ".join(f"{p} {b[0]:.3f} ({b[1]})" for p, b in bests.items())})
    few = lambda name, r: 0 < r["labels"] <= 100  # noqa: E731
    ceiling = lambda name, r: name.startswith("ceiling")  # noqa: E731
    vals = {p: auc(p, lab) for p in B}
    out.append({"target": "AUROC >= 0.90 on B with at most 100 labels", "met": all(v >= 0.9 for v in vals.values()),
                "default": ", ".join(f"{p} {v:.3f}" for p, v in vals.items()),
                "best": ", ".join(f"{p} {best(res, p, few)[0]:.3f} ({best(res, p, few)[1]})" for p in B)
                + "; ceiling with every label: " + ", ".join(f"{p} {best(res, p, ceiling)[0]:.3f} ({best(res, p, ceiling)[1]})" for p in B)})
    spread = {}
    for p in pools:
        for name in (free, lab):
            r = get(p, name)
            spread[(p, name)] = (max(r["removed"]) - min(r["removed"])) / r["n"]
    # Fresh pool draws (benchmarks/calibrated_prior.py): the labelled default must stay steady on them too.
    prior_file = HERE / "results" / "calibrated_prior.json"
    fresh = {}
    if prior_file.exists():
        pr = json.loads(prior_file.read_text())
        fresh = {k: r["weights"][_weight_key(pr, PRIOR_WEIGHT)]["spread"] for k, r in pr["pools"].items() if r["seed"] != 0}
    fresh_text = ("; fresh pool draws (calibrated_prior.py): " + ", ".join(f"{k} {v:.1%}" for k, v in fresh.items())) if fresh else ""
    out.append({"target": "removed count varies < 10% of the pool over 5 label draws",
                "met": all(v < 0.1 for v in spread.values()) and all(v < 0.1 for v in fresh.values()),
                "default": "label-free default: " + ", ".join(f"{p} {spread[(p, free)]:.1%}" for p in pools)
                + "; with 100 labels: " + ", ".join(f"{p} {spread[(p, lab)]:.1%}" for p in pools) + fresh_text,
                "best": "sampling noise of the labels: the harmful share of the same 5 draws of 100 labels spans "
                + ", ".join(f"{p} {np.ptp(get(p, lab)['labelled_harmful_share']):.1%}" for p in pools)})
    kept = {p: float(np.mean(get(p, free)["refusals_kept"])) for p in T}
    kept_lab = {p: float(np.mean(get(p, lab)["refusals_kept"])) for p in T}
    out.append({"target": "at least 90% of safe refusals kept on T", "met": all(v >= 0.9 for v in kept.values()),
                "default": "label-free: " + ", ".join(f"{p} {v:.1%}" for p, v in kept.items())
                + "; with 100 labels: " + ", ".join(f"{p} {v:.1%}" for p, v in kept_lab.items()), "best": "—"})
    # The estimate is judged on benchmarks/estimate.py's three pool seeds (seed 0 = the pools above).
    est = json.loads((HERE / "results" / "estimate.json").read_text())["pools"].values()
    n_seeds = len({r["seed"] for r in est})
    for group in (T, B):  # one row each: the estimate's behaviour differs between the two kinds of pool
        err = {p: max(abs(r["estimate"] - r["truth"]) for r in est if r["pool"] == p) for p in group}
        out.append({"target": f"label-free contamination estimate within 0.05 of the truth on {'/'.join(group)}",
                    "met": all(v <= 0.05 for v in err.values()),
                    "default": f"largest error over {n_seeds} pool seeds (benchmarks/estimate.py): "
                    + ", ".join(f"{p} {v:.3f}" for p, v in err.items()) + "; seed 0: " + ", ".join(
                        f"{p} {np.mean(get(p, free)['contamination_estimate']):.3f} vs {get(p, free)['truth']:.3f}" for p in group),
                    "best": "with 100 labels (calibrated rule, mean of 5 draws, seed 0): " + ", ".join(
                        f"{p} {np.mean(get(p, lab)['contamination_estimate']):.3f}" for p in group)})
    return out


def render(res: dict, checks: list[dict]) -> str:
    lines = [f"From `benchmarks/results/detect_plus.json` ({res['command']}, {res['date']}), `benchmarks/results/estimate.json`, "
             "`benchmarks/results/pool_seeds.json` and `benchmarks/results/calibrated_prior.json` by `python benchmarks/targets.py`. "
             f"Defaults: label-free `{LABEL_FREE_DEFAULT.format(layer=res['layer'])}`; with labels "
             f"`{LABELLED_DEFAULT.format(layer=res['layer'])}`. Guard-based rows count only rows whose prompt the guard "
             "never saw in training.", "", "| target | met | default detectors | best row of the benchmark |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['target']} | {'yes' if c['met'] else '**no**'} | {c['default']} | {c['best']} |")
    return "\n".join(lines)


def main() -> int:
    res = json.loads((HERE / "results" / "detect_plus.json").read_text())
    checks = check(res)
    for c in checks:
        print(f"[{'met' if c['met'] else 'NOT met'}] {c['target']}: {c['default']}")
    write_results_md(render(res, checks), key="targets", title="Issue 4 targets (benchmarks/targets.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
