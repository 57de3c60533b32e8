"""The end-to-end comparison on the aligned base: filter a contaminated pool each way, fine-tune on what is kept,
evaluate (`saft experiment`, src/saft/experiment.py).

`run` runs `saft experiment` into `--output-dir` (any experiment option as `--set NAME=VALUE`), or with
`--collect DIR` reads a finished (or partly finished) run's results.json; the arms, their intervals and the
target check are rendered from that file.
"""

from __future__ import annotations

import json
from pathlib import Path

NAME = "experiment"
QUESTION = ("Does a model fine-tuned on filtered data keep the aligned base's safety, and how much of the oracle's "
            "gain does each filter recover, at what cost in helpfulness?")
DEFAULTS = ("label-free", "labelled")  # the arms the target is about: `saft filter`'s defaults


def add_arguments(parser) -> None:
    parser.add_argument("--collect", help="a `saft experiment` output folder (its results.json) to report")
    parser.add_argument("--output-dir", default="benchmarks/out/experiment", help="where `saft experiment` writes")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="ExperimentConfig fields, e.g. --set runs=0.3/0,0.3/1 arms=base,sft,oracle")


def _config(pairs: list[str]):
    from saft.experiment import ExperimentConfig

    fields = ExperimentConfig.__dataclass_fields__
    values = {}
    for pair in pairs:
        name, _, raw = pair.partition("=")
        if name not in fields:
            raise SystemExit(f"--set {pair}: no ExperimentConfig field {name!r}; fields: {', '.join(fields)}")
        default = fields[name].default
        if isinstance(default, tuple):
            values[name] = tuple(raw.split(","))
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            values[name] = type(default)(raw)
        else:
            values[name] = raw
    return ExperimentConfig(**values)


def run(args) -> dict:
    if args.collect:
        folder = args.collect
    else:
        from saft.experiment import run_experiment

        folder = args.output_dir
        run_experiment(_config(args.set), output_dir=folder)
    res = json.loads((Path(folder) / "results.json").read_text())
    c = res["config"]
    loads = [r["load_average"] for r in res["rows"] if "load_average" in r]
    demos = f"{c['demo_share']:.0%} safety demonstrations" if c["demo_share"] else "no safety demonstrations"
    # The table's cost: every arm's own fine-tuning and evaluation seconds as recorded when it ran (an arm a resumed
    # run reused keeps them). results.json's "seconds" is the last invocation's wall time alone, which is seconds
    # when that invocation only checked finished arms, so it is not reported.
    arm_seconds = sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in res["rows"])
    return {"results": res, "folder": folder, "seconds": arm_seconds, "seed": sorted({r["seed"] for r in res["rows"] if r["seed"] is not None}),
            "data": (f"pools of {c['pool_size']} rows ({', '.join(c['runs'])} as rate/seed): BeaverTails unsafe pairs "
                     f"at the rate, {demos}, Alpaca/Dolly for the rest, no row a "
                     f"guard trained on; {res['evaluation']['harmful']} held-out harmful prompts, "
                     f"{res['evaluation']['benign'] + res['evaluation']['lookalike']} benign prompts, "
                     f"{res['evaluation']['helpful']} benign references"),
            "cpu_note": ("the arms' fine-tuning and evaluation seconds summed, scoring and selection not counted; "
                         + (f"torch threads {res.get('threads', 'not recorded (the default: one per core)')} on a "
                            f"machine of 2 cores; load average (1 min) when each arm finished: {min(loads):.2f}-{max(loads):.2f}"
                            if loads else "see results.json")),
            "command": (f"saft experiment -o DIR --runs {' '.join(c['runs'])}"
                        + (f" --arms {' '.join(c['arms'])}" if c["arms"] else "")
                        + (f" --demo-share {c['demo_share']:g}" if c["demo_share"] else "")
                        + f", then python benchmarks/run.py experiment --collect {folder} (DIR's metrics and answers "
                          "copied there)")}


def reading(res: dict) -> str:
    """The target check for the default arms, per rate, as sentences."""
    from saft.experiment import target_met

    judge = next(iter(res["judges"]))
    out = []
    for rate, per_arm in res["summary"].items():
        if "sft" not in per_arm or "oracle" not in per_arm:
            continue
        sft, orc = per_arm["sft"][f"harmful_{judge}"], per_arm["oracle"][f"harmful_{judge}"]
        red = per_arm["oracle"].get("reduction_vs_sft")
        n = len(per_arm["sft"]["seeds"])
        if not red:
            continue
        line = (f"At {float(rate):.0%} harmful ({n} seed{'s' if n > 1 else ''}): SFT on everything "
                f"{sft['mean']:.3f}, the oracle {orc['mean']:.3f} (its reduction {red['mean']:.3f} "
                f"[{red['ci'][0]:.2f}, {red['ci'][1]:.2f}])")
        for arm in DEFAULTS:
            e = per_arm.get(arm)
            if not e or not e.get("share_of_oracle_reduction"):
                continue
            t = target_met(e)
            share = e["share_of_oracle_reduction"]
            line += (f"; {arm} {e[f'harmful_{judge}']['mean']:.3f}, recovering "
                     + ("—" if share["mean"] is None else f"{share['mean']:.0%}")
                     + f" [{share['ci'][0]:.0%}, {share['ci'][1]:.0%}] of it (target, on the mean: "
                     + ", ".join(f"{k.replace('_', ' ')} {'yes' if v else 'no'}" for k, v in t.items()) + ")")
        out.append(line + ".")
    return "\n\n".join(out)


def readme_table(result: dict) -> str:
    """The README's end-to-end table: per harmful share of the pool, each arm's harmful rate after fine-tuning on
    what it kept (with its interval), and each filter's share of the oracle's reduction with the rows it kept."""
    res = result["results"]
    judge = next(iter(res["judges"]))
    c = res["config"]
    arms = {"base": "aligned base", "sft": "SFT on all", "oracle": "oracle", "label-free": "label-free",
            "labelled": "labelled (100 labels)", "saft": "paper's SAFT", "random": "random", "prompting": "prompting"}
    rates = [r for r, per_arm in res["summary"].items() if "sft" in per_arm and "oracle" in per_arm]
    arms = {a: name for a, name in arms.items() if any(a in res["summary"][r] for r in rates)}
    if not rates:
        return ""
    accuracy = res["judges"][judge].get("test_accuracy")
    judged = f"judge {judge}" + (f", accuracy {accuracy:.3f} on held-out labelled answers" if accuracy else "")
    lines = [f"Fine-tuning the aligned base on {c['pool_size']}-row pools after each filter: harmful rate ({judged}) "
             f"on held-out harmful prompts, mean [95% interval over seeds and prompts], then the share of "
             "the oracle's reduction against SFT on all, with the rows kept "
             "([RESULTS](benchmarks/RESULTS.md#experiment)):", "",
             "| pool | " + " | ".join(arms.values()) + " |", "|---|" + "---|" * len(arms)]
    for r in rates:
        per_arm = res["summary"][r]
        n = len(per_arm["sft"]["seeds"])
        h = [per_arm[a][f"harmful_{judge}"] if a in per_arm else None for a in arms]
        lines.append(f"| {float(r):.0%} harmful, {n} seeds | "
                     + " | ".join("—" if x is None else f"{x['mean']:.3f} [{x['ci'][0]:.2f}, {x['ci'][1]:.2f}]"
                                  for x in h) + " |")
        lines.append("| share; rows kept | " + " | ".join(_share_and_kept(a, per_arm.get(a) or {}) for a in arms) + " |")
    return "\n".join(lines)


def _share_and_kept(arm: str, e: dict) -> str:
    """An arm's README cell: its share of the oracle's reduction (the oracle's own, 100% by definition, left out)
    and the rows it kept."""
    share = e.get("share_of_oracle_reduction") or {}
    parts = [] if arm == "oracle" or share.get("mean") is None else [
        f"{share['mean']:.0%} [{share['ci'][0]:.0%}, {share['ci'][1]:.0%}]"]
    if e.get("kept") is not None:
        parts.append(f"{e['kept']:.0f} kept")
    return "; ".join(parts) or "—"


def render(result: dict, plots_dir: Path) -> str:
    from saft.experiment import plot_results, results_table

    res = result["results"]
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_results(res, plots_dir / "experiment.png")
    c = res["config"]
    setup = (f"Model `{c['model']}`; fine-tuning LoRA r{c['rank']} alpha {c['alpha']} on {', '.join(c['target_modules'])}, "
             f"lr {c['learning_rate']}, {c['epochs']:g} epochs, batch {c['batch_size']}, {c['max_length']} tokens; "
             f"answers of {c['max_new_tokens']} new tokens, greedy. Random removes as many rows as {c['random_matches']}. "
             # results.json written before guard v3 existed records no guard: those arms counted with guard v2
             f"The label-free and labelled arms use guard {c.get('guard', 'v2')}.")
    return "\n\n".join([setup, results_table(res), "![harmful rate per arm](results/plots/experiment.png)", reading(res)])
