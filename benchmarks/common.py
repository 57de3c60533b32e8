"""Helpers every benchmark suite shares: where data, caches and results live, and how results are written."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PLOTS = RESULTS / "plots"
CACHE = HERE / ".cache"  # feature caches of the benchmark pools (not committed)


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    return "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def versions() -> dict:
    from saft.pipeline import versions as v

    return v()


def raw_dir(path: str | None = None) -> Path:
    from saft.pools import default_raw_dir

    return Path(path) if path else default_raw_dir()


def result_path(name: str) -> Path:
    return RESULTS / f"{name}.json"


def write_result(name: str, result: dict) -> Path:
    from saft.data import write_json

    return write_json(result, result_path(name))


def load_result(name: str) -> dict | None:
    path = result_path(name)
    return json.loads(path.read_text()) if path.exists() else None


def load_note() -> str:
    """The load average when a suite ends: whether its time was measured with the CPU to itself."""
    load = os.getloadavg()
    return f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def provenance(result: dict) -> str:
    """The lines under a section's table: command, seed, data and versions of the run that made it."""
    v = result.get("versions", {})
    shown = ", ".join(f"{k} {v[k]}" for k in ("saft", "torch", "transformers", "scikit-learn") if k in v)
    out = [f"Command: `{result.get('command', '?')}`", f"Seed: {result.get('seed', '?')}. Data: {result.get('data', '?')}."]
    if shown:
        out.append(f"Versions: {shown}.")
    if result.get("seconds") is not None:
        out.append(f"Time: {result['seconds']:.0f} s ({result.get('cpu_note', 'CPU use by other jobs not recorded')}).")
    return "\n".join(out)
