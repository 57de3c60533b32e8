"""The `saft` command: each subcommand parses options into a config and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from .data import DataError, FieldOptions
from .detectors import get_spec
from .models import ModelError
from .pipeline import FilterConfig, filter_dataset, run_demo

EXAMPLES = {
    "score": "example:\n  saft score data.jsonl -o out/          # writes out/scores.jsonl and out/summary.json",
    "filter": ("examples:\n  saft filter data.jsonl -o out/                       # auto: label-free, or labelled when 100+ rows are labelled\n"
               "  saft filter data.jsonl -o out/ --detector subspace   # the paper's method: k and tau by F1 on 100 labels\n"
               "  saft filter data.csv -o out/ --rule fraction --fraction 0.1\n"
               "  saft filter chats.parquet -o out/ --layer 20 --labels-file labelled.jsonl"),
    "label": ("examples:\n  saft label data.jsonl -o labels.jsonl          # 30 rows chosen by the guard's scores, for --labels-file\n"
              "  saft label data.jsonl -o sample.jsonl --random -n 400   # a random sample, for --certify\n"
              "keys: h harmful, s safe, k skip, u undo, q quit; answers are saved at once, rerun to resume"),
    "demo": ("example:\n  saft demo -o saft-demo-out      # filters the packaged demo set with the default detector,\n"
             "                                  # and with the paper's method on the embedded model (in paper/)"),
    "finetune": "example:\n  saft finetune out/kept.jsonl -o ft/ --epochs 1 --max-length 128   # writes ft/adapter/",
    "evaluate": ("example:\n  saft evaluate -o ev/ --adapter ft/adapter --harmful-prompts advbench.txt "
                 "--benign-file benign.jsonl"),
    "experiment": "example:\n  saft experiment -o exp/                          # the aligned base, 30% x 3 seeds and 10% x 1\n  saft experiment -o exp/ --runs 0.3/0 --arms base sft oracle label-free   # one run, four arms",
}
# Options whose type the default does not tell.
TYPES = {"layer": str, "n_components": int, "labels_file": str, "fraction": float, "threshold": float,
         "cache_dir": str, "device": str, "dtype": str, "raw_dir": str, "target_modules": str, "arms": str,
         "judges": str, "runs": str, "k_candidates": int, "limit": int, "adapter": str,
         "harmful_prompts": str, "benign_file": str, "certify": float, "certify_stratum_field": str,
         "ray_address": str, "ray_workers": int}


def _add_config_options(parser: argparse.ArgumentParser, cls, title: str, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field, with the field's help string; tuples take several values. Fields whose
    metadata says `advanced` go into a group of their own, after the others."""
    group = parser.add_argument_group(title)
    advanced = parser.add_argument_group("advanced")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        target = advanced if f.metadata.get("advanced") else group
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default
        if isinstance(default, bool):
            target.add_argument(flag, action="store_true", help=help_)
        elif isinstance(default, tuple):
            shown = " ".join(map(str, default)) or "all"
            target.add_argument(flag, type=TYPES.get(f.name, str), nargs="+", default=list(default),
                                help=f"{help_} (default: {shown})")
        else:
            if default is None and f.name not in TYPES:  # a programming error: say so instead of a parse failure
                raise TypeError(f"add {f.name!r} to saft.cli.TYPES: its default None does not tell its type")
            shown = "" if default is None else f" (default: {default})"
            target.add_argument(flag, type=TYPES.get(f.name, type(default)), default=default, help=help_ + shown)


def _from_args(cls, args, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    layer = values.get("layer")
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        values["layer"] = int(layer)
    values.update(overrides)
    return cls(**values)


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input fields (detected when not given)")
    group.add_argument("--messages-field", help="field holding a chat message list")
    group.add_argument("--prompt-field", help="field holding the prompt (with --response-field)")
    group.add_argument("--response-field", help="field holding the response (with --prompt-field)")
    group.add_argument("--label-field", help="label field (default: is_safe, harmful, is_harmful, label, unsafe)")
    group.add_argument("--label-means", choices=["harmful", "safe"], help="what a true label means (default: safe "
                       "for is_safe, else harmful)")
    group.add_argument("--id-field", help="unique sample id field (default: 'id' if present, else the row number)")
    group.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (written to invalid.jsonl) "
                       "instead of stopping")


COMMANDS = {
    "score": "score every sample (nothing removed)",
    "filter": "score and select samples to remove; write kept/removed rows",
    "label": "label rows in the terminal: chosen ones for --labels-file, or a random sample for --certify",
    "demo": "filter the packaged demo dataset (default detector, and the paper's method on the embedded model)",
    "finetune": "LoRA fine-tuning on a dataset (loss on responses only)",
    "evaluate": "harmfulness and helpfulness of a model or model + adapter",
    "experiment": "the paper's comparison: filter several ways, fine-tune each, evaluate",
}


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import EvaluateConfig
    from .experiment import ExperimentConfig
    from .finetune import FinetuneConfig

    parser = argparse.ArgumentParser(
        prog="saft", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find and remove harmful samples from an LLM fine-tuning dataset (SAFT), then fine-tune and evaluate.",
        epilog="examples:\n  saft demo -o saft-demo-out\n  saft filter data.jsonl -o out/\n  saft finetune out/kept.jsonl -o ft/\n"
               "  saft experiment -o exp/")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and third-party progress output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or log messages")
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging and third-party progress output")
        if name in ("score", "filter", "finetune", "label"):
            p.add_argument("data", help="JSONL, JSON, CSV or Parquet file, or a saved datasets folder")
            _add_data_options(p)
        if name == "label":
            p.add_argument("-o", "--output", required=True, help="labels file (JSONL) to write, or to resume")
            p.add_argument("-n", type=int, default=30, help="labels to collect (default: 30)")
            p.add_argument("--random", action="store_true", help="a uniformly random sample (for --certify) instead "
                           "of rows chosen by the scores (for the calibrated rule)")
            p.add_argument("--detector", default="guard", help="label-free detector whose scores choose the rows "
                           "(default: guard, which loads no model)")
            p.add_argument("--seed", type=int, default=0, help="seed of the choice or of the random sample")
            p.add_argument("--cache-dir", help="feature cache (default ~/.cache/saft or $SAFT_CACHE)")
            continue
        default_out = {"demo": "saft-demo-out"}.get(name)
        p.add_argument("-o", "--output-dir", required=default_out is None, default=default_out,
                       help="folder for the outputs (created if missing)")
        if name in ("score", "filter", "demo"):
            p.add_argument("--report", action="store_true", help="also write report.html, an audit report for a browser")
            _add_config_options(p, FilterConfig, "scoring and selection", skip=("rule", "certify", "delta", "certify_stratum_field") if name == "score" else ())
        elif name == "finetune":
            _add_config_options(p, FinetuneConfig, "fine-tuning")
        elif name == "evaluate":
            _add_config_options(p, EvaluateConfig, "evaluation")
        else:
            _add_config_options(p, ExperimentConfig, "experiment")
    return parser


def _print_summary(summary: dict) -> None:
    print(f"{summary['n_samples']} samples from {summary['input']} ({summary['format']}, {summary['schema']})")
    if summary["n_invalid"]:
        print(f"  skipped {summary['n_invalid']} invalid rows (written to invalid.jsonl)")
    if summary["n_truncated"]:
        print(f"  truncated {summary['n_truncated']} samples to {summary['config']['max_length']} tokens")
    detector = f"k={summary['k']}" if summary["k"] is not None else f"detector {summary['detector']}"
    if summary.get("requested", {}).get("detector") == "auto":
        labelled = "labels present" if get_spec(summary["detector"]).labels else "too few labels"
        detector += f" (auto: {labelled})"
    if summary["layer"] is None:
        print(f"features: {summary['model']}; {detector}")
    else:
        positions = summary.get("positions") or [summary["position"]]
        where = f"position{'s' if len(positions) > 1 else ''} {' + '.join(positions)}"
        print(f"model {summary['model']}, layer {summary['layer']}, {where}, {detector}")
    if "contamination_estimate" in summary["rule_params"]:
        params = summary["rule_params"]
        source = "label-free" if summary["rule"] == "estimate" else "calibrated on the labels"
        if "prior_estimate" in params:
            source += (f": {params['platt_estimate']:.3f}, with the label-free {params['prior_estimate']:.3f} as a prior "
                       f"worth {params['prior_weight']:g} labels")
        se = summary["rule_params"].get("contamination_estimate_se")
        print(f"estimated contamination ({source}): {summary['rule_params']['contamination_estimate']:.3f}"
              + (f" (standard error {se:.3f})" if se is not None else ""))
    if summary["rule_params"].get("margin"):
        print(f"  removing {summary['rule_params']['margin']:g} standard errors past the estimated count "
              "(a missed harmful row costs more than a removed safe one; --margin 0 removes the count)")
    if summary["rule"] == "certify":
        print(f"certificate: {summary['rule_params']['reason']}")
    trust = summary.get("trust")
    if trust:
        print(f"  {trust['level']:.0%} interval {trust['interval'][0]:.3f}-{trust['interval'][1]:.3f}; distance to the "
              f"guard's training rows {trust['distance']:.3f} (unlike them above {trust['distance_threshold']:.3f})")
        if trust.get("advice"):
            print(f"  warning: {trust['advice']}")
    if summary["rule"] != "none":
        print(f"rule {summary['rule']}: threshold {summary['threshold']:.6g}; removed {summary['n_removed']}, "
              f"kept {summary['n_kept']}")
    m = summary["metrics"]
    if m.get("auroc") is not None:
        line = f"against {m['n_labeled']} labels: AUROC {m['auroc']:.3f}, AUPRC {m['auprc']:.3f}"
        if summary["rule"] != "none":
            after = m["harmful_fraction_after"]
            line += (f", F1 {m['f1']:.3f} (precision {m['precision']:.3f}, recall {m['recall']:.3f}); harmful "
                     f"fraction {m['harmful_fraction_before']:.3f} -> {'n/a' if after is None else f'{after:.3f}'}")
        print(line)
    held = summary.get("metrics_unused_labels")
    if held and held.get("auroc") is not None:
        print(f"  of which the {held['n_labeled']} labelled rows not used to fit or select: AUROC {held['auroc']:.3f}"
              + (f", F1 {held['f1']:.3f}" if summary["rule"] != "none" else ""))
    for name, path in summary.get("outputs", {}).items():
        print(f"  {name:8s} {path}")


def _fields(args) -> FieldOptions:
    return FieldOptions(messages_field=args.messages_field, prompt_field=args.prompt_field,
                        response_field=args.response_field, label_field=args.label_field,
                        label_meaning=args.label_means, id_field=args.id_field)


def _run_training_commands(args) -> int:
    progress = not args.quiet
    if args.command == "finetune":
        from .data import load_samples, write_invalid
        from .finetune import FinetuneConfig, finetune

        ds = load_samples(args.data, fields=_fields(args), skip_invalid=args.skip_invalid)
        res = finetune(ds.samples, output_dir=args.output_dir, config=_from_args(FinetuneConfig, args), progress=progress)
        print(f"fine-tuned on {res['n_samples']} samples, {res['steps']} steps, train loss {res['train_loss']:.4f}")
        if ds.skipped:  # the rows left out of training are kept, as `saft filter` keeps them
            path = write_invalid(ds, Path(args.output_dir) / "invalid.jsonl")
            print(f"skipped {len(ds.skipped)} invalid rows (written to {path})")
        print(f"adapter: {res['adapter']}")
    elif args.command == "evaluate":
        from .evaluate import EvaluateConfig, run_evaluation

        res = run_evaluation(_from_args(EvaluateConfig, args), output_dir=args.output_dir, progress=progress)
        for name, j in res["harmful"]["judges"].items():
            acc = f" (judge accuracy {j['judge_test_accuracy']})" if j.get("judge_test_accuracy") else ""
            print(f"harmful rate [{name}]: {j['harmful_rate']:.3f}{acc}; disagrees with the refusal keywords on "
                  f"{j['disagreement_with_refusal']:.3f}")
        print(f"refusal rate on harmful prompts: {res['harmful']['refusal_rate']:.3f}")
        if res["helpful"].get("refusal_rate") is not None:
            print(f"refusal rate on benign prompts: {res['helpful']['refusal_rate']:.3f} (over-refusal)")
        if res["helpful"].get("rouge_l") is not None:
            print(f"ROUGE-L {res['helpful']['rouge_l']:.3f}, reference loss {res['helpful']['reference_loss']:.3f}")
        print(f"outputs: {args.output_dir}/metrics.json, generations.jsonl")
    else:
        from .experiment import ExperimentConfig, run_experiment

        res = run_experiment(_from_args(ExperimentConfig, args), output_dir=args.output_dir, progress=progress)
        print((Path(args.output_dir) / "results.md").read_text())
        print(f"outputs: {args.output_dir}/results.json, results.md, results.png")
    return 0


def _quiet_third_parties(*, bars: bool) -> None:
    """Silence the libraries' own loading messages and warnings; with `bars`, also their progress bars
    ("Loading weights", "Map", "Batches"), so that each long step shows only saft's own bar."""
    import os
    import warnings

    warnings.filterwarnings("ignore")
    for noisy in ("transformers", "datasets", "huggingface_hub", "sentence_transformers", "accelerate", "peft",
                  "ray", "ray.data"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if bars:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import datasets
        import huggingface_hub
        import transformers

        huggingface_hub.utils.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        _quiet_third_parties(bars=True)
    try:
        if args.command in ("finetune", "evaluate", "experiment"):
            return _run_training_commands(args)
        if args.command == "label":
            from .label import label_dataset

            res = label_dataset(Path(args.data), args.output, n=args.n, random=args.random, detector=args.detector,
                                seed=args.seed, fields=_fields(args), skip_invalid=args.skip_invalid,
                                progress=not args.quiet, cache_dir=args.cache_dir)
            print(f"{res.n_labelled} labelled ({res.n_harmful} harmful), {res.n_skipped} skipped: {res.output}")
            return 0
        config = _from_args(FilterConfig, args, **({"rule": "none"} if args.command == "score" else {}))
        if args.command == "demo":
            result, paper = run_demo(args.output_dir, config=config, progress=not args.quiet, report=args.report)
        else:
            result = filter_dataset(Path(args.data), output_dir=args.output_dir, config=config, fields=_fields(args),
                                    skip_invalid=args.skip_invalid, progress=not args.quiet, report=args.report)
    except (DataError, ModelError, ValueError) as e:
        print(f"saft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saft: interrupted; finished work is cached, rerun the same command to resume", file=sys.stderr)
        return 130
    _print_summary(result.summary)
    if args.command == "demo":
        if paper is not None:
            print("\nthe paper's method (subspace score, k and tau by F1 on 100 labels) on the same rows:")
            _print_summary(paper.summary)
        print(f"\ndemo outputs are in {Path(args.output_dir).resolve()} (summary: summary.json)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
