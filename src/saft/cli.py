"""The `saft` command: each subcommand parses options into a config and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from importlib import resources
from pathlib import Path

from .data import DataError, FieldOptions
from .models import ModelError
from .pipeline import FilterConfig, filter_dataset

EXAMPLES = {
    "score": "example:\n  saft score data.jsonl -o out/          # writes out/scores.jsonl and out/summary.json",
    "filter": ("examples:\n  saft filter data.jsonl -o out/                       # the paper's rule: k and tau by F1 on 100 labels\n"
               "  saft filter data.csv -o out/ --rule fraction --fraction 0.1\n"
               "  saft filter chats.parquet -o out/ --layer 20 --labels-file labelled.jsonl"),
    "demo": "example:\n  saft demo -o saft-demo-out      # filters the packaged demo set with the embedded model",
}
# Options of FilterConfig whose type the default does not tell.
TYPES = {"layer": str, "n_components": int, "labels_file": str, "fraction": float, "threshold": float,
         "cache_dir": str, "device": str, "dtype": str}


def _add_config_options(parser: argparse.ArgumentParser, *, rule_default: str | None = None) -> None:
    group = parser.add_argument_group("scoring and selection")
    for f in dataclasses.fields(FilterConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.name == "rule" and rule_default == "none":
            continue  # `saft score` never removes
        default = f.default
        if isinstance(default, bool):
            group.add_argument(flag, action="store_true", help=help_)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=int, nargs="+", default=list(default), help=f"{help_} (default: {' '.join(map(str, default))})")
        else:
            typ = TYPES.get(f.name, type(default))
            group.add_argument(flag, type=typ, default=default, help=f"{help_} (default: {default})")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input fields (detected when not given)")
    group.add_argument("--messages-field", help="field holding a chat message list")
    group.add_argument("--prompt-field", help="field holding the prompt (with --response-field)")
    group.add_argument("--response-field", help="field holding the response (with --prompt-field)")
    group.add_argument("--label-field", help="label field (default: is_safe, harmful, is_harmful, label or unsafe)")
    group.add_argument("--label-means", choices=["harmful", "safe"], help="what a true label value means (default: safe for is_safe, harmful otherwise)")
    group.add_argument("--id-field", help="field holding a unique sample id (default: 'id' if present, else the row number)")
    group.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (counted in summary.json) instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saft", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find and remove harmful samples from an LLM fine-tuning dataset (SAFT).",
        epilog="examples:\n  saft demo -o saft-demo-out\n  saft filter data.jsonl -o out/\n  saft score data.jsonl -o out/")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in (("score", "score every sample (nothing removed)"),
                        ("filter", "score and select samples to remove; write kept/removed rows"),
                        ("demo", "filter the packaged demo dataset with the embedded model")):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name != "demo":
            p.add_argument("data", help="JSONL, JSON, CSV or Parquet file, or a saved datasets folder")
            p.add_argument("-o", "--output-dir", required=True, help="folder for the outputs (created if missing)")
            _add_data_options(p)
        else:
            p.add_argument("-o", "--output-dir", default="saft-demo-out", help="folder for the outputs (default: saft-demo-out)")
        _add_config_options(p, rule_default="none" if name == "score" else None)
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or log messages")
    return parser


def _config(args) -> FilterConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FilterConfig) if hasattr(args, f.name)}
    if args.command == "score":
        values["rule"] = "none"
    if "k_candidates" in values:
        values["k_candidates"] = tuple(values["k_candidates"])
    layer = values.get("layer")
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        values["layer"] = int(layer)
    return FilterConfig(**values)


def _print_summary(summary: dict) -> None:
    print(f"{summary['n_samples']} samples from {summary['input']} ({summary['format']}, {summary['schema']})")
    if summary["n_skipped_invalid"]:
        print(f"  skipped {summary['n_skipped_invalid']} invalid rows (listed in summary.json)")
    if summary["n_truncated"]:
        print(f"  truncated {summary['n_truncated']} samples to {summary['config']['max_length']} tokens")
    print(f"model {summary['model']}, layer {summary['layer']}, position {summary['position']}, k={summary['k']}")
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
    for name, path in summary.get("outputs", {}).items():
        print(f"  {name:8s} {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore")
        for noisy in ("transformers", "datasets", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        config = _config(args)
        if args.command == "demo":
            data = resources.files("saft") / "demo" / "demo.jsonl"
            fields = FieldOptions()
            skip = False
        else:
            data = args.data
            fields = FieldOptions(messages_field=args.messages_field, prompt_field=args.prompt_field,
                                  response_field=args.response_field, label_field=args.label_field,
                                  label_meaning=args.label_means, id_field=args.id_field)
            skip = args.skip_invalid
        result = filter_dataset(Path(str(data)), output_dir=args.output_dir, config=config, fields=fields,
                                skip_invalid=skip, progress=not args.quiet)
    except (DataError, ModelError, ValueError) as e:
        print(f"saft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saft: interrupted; finished feature batches are cached, rerun to resume", file=sys.stderr)
        return 130
    _print_summary(result.summary)
    if args.command == "demo":
        print(f"\ndemo outputs are in {Path(args.output_dir).resolve()} (summary: summary.json)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
