"""Build the packaged demo dataset src/saft/demo/demo.jsonl from shared/data/raw (see its README).

    python scripts/build_demo.py [--raw-dir ../shared/data/raw]
"""

import argparse
import json
from pathlib import Path

from saft.pools import task_pool

OUT = Path(__file__).resolve().parents[1] / "src" / "saft" / "demo" / "demo.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-dir", default=None)
    args = parser.parse_args()
    samples = task_pool(200, harmful_rate=0.25, refusal_rate=0.1, seed=2024, raw_dir=args.raw_dir)
    with open(OUT, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"id": s.id, "prompt": s.messages[0]["content"], "response": s.response,
                                "is_safe": not s.label, "source": s.meta["source"]}, ensure_ascii=False) + "\n")
    print(f"wrote {len(samples)} rows to {OUT}")


if __name__ == "__main__":
    main()
