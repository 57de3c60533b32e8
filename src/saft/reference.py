"""The packaged guard's labelled training rows, seen by the model about to be fine-tuned (for the label-free detector).

The packaged guard (`saft.detectors.guard`) learned what "harmful" means from 2306 public rows in a sentence
encoder's view. The label-free detector learns it again from the same rows in the view of the model being fine-tuned, so
those rows ship as text (`guard_rows_v1.jsonl.gz`, built by scripts/build_reference.py from the project's
shared/data/raw: BeaverTails 30k_test pairs of the 'judge' half of the prompt split, CC BY-NC 4.0, and refusals
written by a safety-tuned Llama-2-chat, MIT; see `guard_rows_README.md`).

Their hidden states depend on the model, so they are computed at run time and cached like a pool's. That costs
about 15 CPU minutes with the 135M embedded model (measured: 907 s), so the embedded model's features of these
rows at its default settings ship too (`guard_rows_v1_embedded.npz`, float16, with the feature manifest they were
computed under, and the sentence view). `reference_view` puts them into the feature store only when
`extract_features` would compute exactly that manifest (same weights fingerprint, layer, positions, maximum
length and tokenised rows); any other model or setting computes its own.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .data import Sample, atomic_open
from .encoders import sentence_cache_path
from .features import feature_manifest, store_features

logger = logging.getLogger(__name__)

ROWS_FILE = Path(__file__).resolve().parent / "guard_rows_v1.jsonl.gz"
SHIPPED_FILE = Path(__file__).resolve().parent / "guard_rows_v1_embedded.npz"


def reference_samples(path: str | Path | None = None) -> list[Sample]:
    """The guard's training rows as labelled `Sample`s (label 1 = harmful), in their shipped order."""
    path = Path(path) if path else ROWS_FILE
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Sample(id=f"guard-{i:05d}", label=int(r["harmful"]),
                   messages=[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
                   meta={"source": r["source"], "category": r.get("category")}) for i, r in enumerate(rows)]


def place_shipped_views(model, tokenizer, samples: Sequence[Sample], *, layer, positions: Sequence[str],
                        max_length: int, cache_dir: str | Path, shipped: str | Path | None = None) -> bool:
    """Copy the shipped sentence view and hidden states of the guard's rows into `cache_dir` (the sentence cache
    and the feature store), where `sentence_features` and `extract_features` will find them, when they were computed for exactly these rows
    (and, for the hidden states, this model and these settings). Returns whether the hidden states matched."""
    shipped = Path(shipped) if shipped else SHIPPED_FILE
    if not shipped.exists():
        return False
    with np.load(shipped) as z:
        meta = json.loads(str(z["meta"]))
        sentence_path = sentence_cache_path(samples, cache_dir)
        # The cache file's name hashes the encoder and every text: equal names mean the same rows, same encoder.
        if meta["sentence_file"] == sentence_path.name and not sentence_path.exists():
            sentence_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(sentence_path, "wb") as f:
                np.save(f, z["sentence"].astype(np.float32))
        manifest = feature_manifest(model, tokenizer, samples, layers=[layer], positions=positions, max_length=max_length)
        if manifest != meta["manifest"]:
            logger.info("the shipped features of the guard's rows are for another model or setting: computing them")
            return False
        written = store_features(model, tokenizer, samples, z["hidden"], layers=manifest["layers"],
                                 positions=manifest["positions"], max_length=max_length, cache_dir=cache_dir)
        if written:
            logger.info("placed the shipped features of %d guard rows in the feature store", written)
    return True


def reference_view(view: Callable[[list[Sample]], np.ndarray], model, tokenizer, *, layer, positions: Sequence[str],
                   max_length: int, cache_dir: str | Path | None,
                   samples: Sequence[Sample] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the guard's rows in a detector's view: `view(samples)` computes that view (the
    pipeline's, so the layout matches the pool's exactly); the shipped features are placed in `cache_dir` first."""
    samples = list(samples) if samples is not None else reference_samples()
    if cache_dir is not None:
        place_shipped_views(model, tokenizer, samples, layer=layer, positions=positions, max_length=max_length,
                            cache_dir=cache_dir)
    return view(samples), np.array([s.label for s in samples])
