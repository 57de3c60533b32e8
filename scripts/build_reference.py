"""Write the guard's training rows and the embedded model's features of them into the package (for the label-free detector).

    python scripts/build_reference.py [--raw-dir ../shared/data/raw] [--cache benchmarks/.cache]

- src/saft/guard_rows_v1.jsonl.gz: the rows scripts/train_guard.py trains the packaged guard on
  (`saft.pools.guard_training_rows`), one JSON object per line {prompt, response, harmful, source, category},
  gzip without a timestamp so that a rebuild from the same raw files gives the same bytes.
- src/saft/guard_rows_v1_embedded.npz: their sentence view, and the embedded model's hidden states at its
  default layer ("middle") and the label-free detector's default positions (prompt_last, response_mean; max length 512), as
  float16, with the feature manifest they were computed under (`saft.reference` uses them only when a run's
  manifest is the same). The hidden states are computed for every layer and position, so that
  a feature cache of any earlier run (`--cache`) serves them: about 15 CPU minutes otherwise.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path

import numpy as np

from saft.data import atomic_open
from saft.encoders import ENCODER_VERSION, sentence_cache_path, sentence_features
from saft.features import POSITIONS, extract_features, feature_manifest
from saft.models import load_model
from saft.pools import guard_training_rows
from saft.reference import ROWS_FILE, SHIPPED_FILE, reference_samples

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_POSITIONS = ["prompt_last", "response_mean"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-dir", default=None)
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"))
    args = ap.parse_args()
    rows = guard_training_rows(args.raw_dir)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        for r in rows:
            gz.write((json.dumps({k: r[k] for k in ("prompt", "response", "harmful", "source", "category")},
                                 ensure_ascii=False) + "\n").encode("utf-8"))
    with atomic_open(ROWS_FILE, "wb") as f:
        f.write(buf.getvalue())
    samples = reference_samples(ROWS_FILE)
    model, tok = load_model(None, device="cpu")
    S = sentence_features(samples, cache_dir=Path(args.cache) / "sentence", progress=True)
    feats = extract_features(model, tok, samples, layers="all", positions=list(POSITIONS), max_length=512,
                             batch_size=8, cache_dir=Path(args.cache), progress=True)
    manifest = feature_manifest(model, tok, samples, layers="middle", positions=SHIPPED_POSITIONS, max_length=512)
    layer = manifest["layers"][0]
    # (rows, positions, 1 layer, width): the layout extract_features stores and reads back.
    hidden = np.stack([feats.get(layer, p) for p in SHIPPED_POSITIONS], axis=1)[:, :, None, :]
    if np.abs(hidden).max() > 6e4:
        raise SystemExit("hidden states exceed float16's range; ship them as float32")
    meta = {"encoder": ENCODER_VERSION, "sentence_file": sentence_cache_path(samples, ".").name, "manifest": manifest}
    with atomic_open(SHIPPED_FILE, "wb") as f:
        np.savez_compressed(f, meta=json.dumps(meta), sentence=S.astype(np.float16), hidden=hidden.astype(np.float16))
    print(f"wrote {ROWS_FILE} ({len(rows)} rows, {sum(r['harmful'] for r in rows)} harmful) and {SHIPPED_FILE} "
          f"(layer {layer}, {', '.join(SHIPPED_POSITIONS)}; {SHIPPED_FILE.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
