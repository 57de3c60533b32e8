"""Every benchmark behind one entry point.

    python benchmarks/run.py list                 # the suites and the question each answers
    python benchmarks/run.py SUITE [options]      # run one suite; writes benchmarks/results/SUITE.json
    python benchmarks/run.py report               # rebuild benchmarks/RESULTS.md from the result files

A suite is a module in benchmarks/suites/ with NAME, QUESTION, add_arguments(parser), run(args) -> dict and
render(result, plots_dir) -> str (its section of RESULTS.md). Running a suite also rebuilds RESULTS.md.
They need the public data files in ../shared/data/raw (or $SAFT_RAW_DIR).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# The order of RESULTS.md.
ORDER = ("detection", "labels", "certify", "experiment", "scale", "reliability")


def suites() -> dict:
    found = {}
    for path in sorted((common.HERE / "suites").glob("*.py")):
        if path.stem.startswith("_"):
            continue
        module = importlib.import_module(f"suites.{path.stem}")
        found[module.NAME] = module
    return dict(sorted(found.items(), key=lambda kv: (ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER), kv[0])))


def report() -> Path:
    """Write RESULTS.md: one section per suite that has a result file, in ORDER."""
    from saft.data import atomic_open

    common.PLOTS.mkdir(parents=True, exist_ok=True)
    sections, index = [], []
    for name, module in suites().items():
        result = common.load_result(name)
        if result is None:
            continue
        index.append(f"- [{name}](#{name}): {module.QUESTION}")
        body = module.render(result, common.PLOTS).strip()
        if body.startswith(f"## {name}"):  # the section's heading is written here, once
            body = body.split("\n", 1)[1].strip() if "\n" in body else ""
        first, _, rest = body.partition("\n\n")
        if module.QUESTION in first:  # and so is its question
            body = rest.strip()
        sections.append(f"## {name}\n\n**Question.** {module.QUESTION}\n\n{body}\n\n{common.provenance(result)}\n")
    head = ("# Results\n\nEvery number here comes from a result file in `benchmarks/results/`, written by the command "
            "shown under its table; `python benchmarks/run.py report` rebuilds this page from those files.\n\n"
            + "\n".join(index) + "\n")
    path = common.HERE / "RESULTS.md"
    with atomic_open(path) as f:
        f.write(head + "\n" + "\n".join(sections))
    _readme_tables()
    return path


def _readme_tables() -> None:
    """Put each suite's `readme_table(result)` (those that have one) between the README's markers for that suite
    (`<!-- results:NAME:start -->` ... `<!-- results:NAME:end -->`), so the README quotes the result files and
    nothing else."""
    from saft.data import atomic_open

    readme = common.HERE.parent / "README.md"
    text = new = readme.read_text()
    for name, module in suites().items():
        start, end = f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
        if start not in new or end not in new or not hasattr(module, "readme_table"):
            continue
        result = common.load_result(name)  # read only for a suite the README quotes
        if result is None:
            continue
        table = module.readme_table(result).strip()
        block = start + "\n" + table + ("\n" if table else "") + end
        new = new[:new.index(start)] + block + new[new.index(end) + len(end):]
    if new != text:
        with atomic_open(readme) as f:
            f.write(new)


def main(argv=None) -> int:
    available = suites()
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    sub.add_parser("list", help="the suites and their questions")
    sub.add_parser("report", help="rebuild RESULTS.md from the result files")
    for name, module in available.items():
        p = sub.add_parser(name, help=module.QUESTION, description=module.QUESTION)
        module.add_arguments(p)
    args = parser.parse_args(argv)
    if args.suite == "list":
        for name, module in available.items():
            print(f"{name:12s} {module.QUESTION}")
        return 0
    if args.suite != "report":
        t0 = time.time()
        result = available[args.suite].run(args)
        result.setdefault("command", common.command_line())
        result.setdefault("versions", common.versions())
        result.setdefault("seconds", round(time.time() - t0, 1))
        result.setdefault("cpu_note", common.load_note())
        print(f"wrote {common.write_result(args.suite, result)}")
    print(f"wrote {report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
