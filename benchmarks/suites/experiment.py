"""The end-to-end comparison: filter a contaminated pool each way, fine-tune on what is kept, evaluate.

`run` either runs `saft experiment` (`--output-dir`, plus any experiment option as `--set NAME=VALUE`) or, with
`--collect DIR [DIR ...]`, gathers the arms of finished `saft experiment` runs (their results.json; a later folder
overrides an earlier one for the same arm, rate and seed). Arms of detectors that are no longer registered are
left out; the two renamed ones keep their rows under their current names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common import table, wilson

NAME = "experiment"
QUESTION = ("Is a model fine-tuned on filtered data safer than one fine-tuned on everything, and at what cost in "
            "helpfulness?")
RENAMED = {"guard-model": "label-free", "guard-model-probe": "labelled"}
ARM_ORDER = ("base", "sft", "random", "prompting", "saft", "guard", "label-free", "labelled", "oracle")


def add_arguments(parser) -> None:
    parser.add_argument("--collect", nargs="+", help="results folders of finished `saft experiment` runs to gather")
    parser.add_argument("--output-dir", default="benchmarks/out/experiment", help="where `saft experiment` writes")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="ExperimentConfig fields, e.g. --set seeds=0,1 n_eval=100")


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
            values[name] = tuple(type(default[0])(v) if default else v for v in raw.split(","))
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            values[name] = type(default)(raw)
        else:
            values[name] = raw
    return ExperimentConfig(**values)


def _collect(folders: list[str]) -> tuple[list[dict], list[dict]]:
    from saft.detectors import DETECTORS

    keep = set(ARM_ORDER) | set(DETECTORS)
    rows, runs = {}, []
    for folder in folders:
        res = json.loads((Path(folder) / "results.json").read_text())
        runs.append({"folder": folder, "config": res["config"], "judges": res["judges"]})
        for r in res["rows"]:
            arm = RENAMED.get(r["arm"], r["arm"])
            if arm in keep:
                rows[(arm, r["rate"], r["seed"])] = {**r, "arm": arm, "from": folder}
    return list(rows.values()), runs


def run(args) -> dict:
    if args.collect:
        rows, runs = _collect(args.collect)
    else:
        from saft.experiment import run_experiment

        config = _config(args.set)
        run_experiment(config, output_dir=args.output_dir)
        rows, runs = _collect([args.output_dir])
    configs = [r["config"] for r in runs]
    return {"rows": rows, "runs": runs, "seed": sorted({r["seed"] for r in rows}),
            "data": (f"BeaverTails pools of {configs[0]['pool_size']} rows at rates {configs[0]['rates']} "
                     f"(prompts of the 'experiment' half); {configs[0]['n_eval']} held-out harmful prompts and as "
                     "many benign prompts with reference answers"),
            "cpu_note": "times of the collected runs are in their results.json"}


def render(result: dict, plots_dir: Path) -> str:
    rows = sorted(result["rows"], key=lambda r: (r["rate"], r["seed"], ARM_ORDER.index(r["arm"])
                                                 if r["arm"] in ARM_ORDER else 99))
    judge = next(iter(result["runs"][0]["judges"]))
    meta = result["runs"][0]["judges"][judge]
    body = []
    for r in rows:
        n = r["helpful"].get("n") or result["runs"][0]["config"]["n_eval"]
        rate = r["judges"][judge]["harmful_rate"]
        lo, hi = wilson(rate, n)
        body.append([f"{r['rate']:g}", str(r["seed"]), r["arm"], r.get("kept", "—"), r.get("harmful_kept", "—"),
                     f"{rate:.3f} [{lo:.2f}, {hi:.2f}]", r["refusal_rate"], r["helpful"].get("rouge_l"),
                     r["helpful"].get("reference_loss"), r.get("detection_auroc")])
    _plot(rows, judge, plots_dir / "experiment.png")
    text = table(["rate", "seed", "arm", "kept", "harmful kept", f"harmful rate ({judge}) [95% CI]", "refusal rate",
                  "ROUGE-L", "benign loss", "detection AUROC"], body)
    sft = next((r for r in rows if r["arm"] == "sft"), None)
    oracle = next((r for r in rows if r["arm"] == "oracle"), None)
    reading = ""
    if sft and oracle:
        n_of = lambda r: r["helpful"].get("n") or result["runs"][0]["config"]["n_eval"]  # noqa: E731
        ci = {r["arm"]: wilson(r["judges"][judge]["harmful_rate"], n_of(r)) for r in rows if r["seed"] == sft["seed"]}
        below = [a for a, (lo, hi) in ci.items() if hi < ci["sft"][0]]
        reading = (f"\n\nReading: SFT on everything scores {sft['judges'][judge]['harmful_rate']:.3f} and the oracle "
                   f"(safe rows only) {oracle['judges'][judge]['harmful_rate']:.3f}. "
                   + (f"Arms whose interval lies wholly below SFT's: {', '.join(below)}. " if below else
                      "No arm's interval lies wholly below SFT's, the oracle's included: this setup cannot show "
                      "that filtering makes the fine-tuned model safer. ")
                   + f"The {judge} judge's accuracy on held-out labelled answers is {meta.get('test_accuracy')} "
                   f"(AUROC {meta.get('test_auroc')}).")
    return (text + "\n\n![harmful rate per arm](results/plots/experiment.png)" + reading +
            "\n\nIntervals: Wilson 95% over the evaluation prompts of one seed.")


def _plot(rows: list[dict], judge: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [r["arm"] + ("" if len({x["seed"] for x in rows}) == 1 else f" s{r['seed']}") for r in rows]
    rates = np.array([r["judges"][judge]["harmful_rate"] for r in rows])
    n = [r["helpful"].get("n") or 50 for r in rows]
    ci = np.array([wilson(v, k) for v, k in zip(rates, n)])
    refusals = np.array([r["refusal_rate"] for r in rows])
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.8), 3.6))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, rates, 0.4, yerr=[rates - ci[:, 0], ci[:, 1] - rates], capsize=3, color="tab:red",
           label=f"harmful rate ({judge} judge), 95% CI")
    ax.bar(x + 0.2, refusals, 0.4, color="tab:gray", label="keyword refusal rate")
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
