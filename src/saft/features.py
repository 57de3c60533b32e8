"""Hidden-state features of samples: chosen layers, chosen token positions, stored once per row on disk.

Layer numbering follows transformers' `hidden_states`: 0 is the embedding output, layer l (1 <= l < L) the
residual stream after decoder block l, and L the final (normed) output, as the paper counts (15 of 32 on
Llama-2). Positions:
- `prompt_last`: the last token before the response starts (the paper's; it sees only the prompt);
- `last`: the last token of the sequence;
- `response_mean`: the mean over response tokens.

One forward pass serves every requested layer and position. The pass stops after the deepest layer needed
(a pre-hook on the next block raises) and never runs the LM head. Batches are sorted by length so padding is
small.

The store (`cache_dir/rows-v2/`) keeps one folder per slot, a (model weights, layer, position, maximum length)
combination, holding fixed-size shards: `shard-*.npy` (rows x width, float32, memory-mapped when read) and
`shard-*.keys.npy` (one 16-byte key per row: a hash of the row's token ids and prompt length). A row is thus
found by its content, whatever file, subset or order it arrives in: a run reuses every hidden state an earlier run
computed, and computes only the rows (and slots) it lacks. Samples are encoded and looked up a block at a time,
so memory stays flat as rows grow. Each shard is written to a temporary file and renamed, data first, keys last:
a keys file means a complete shard, a data file whose size does not match its header is deleted and its rows
computed again, and two processes sharing a store only ever add whole shards (at worst both compute a row once).
Shards are flushed every `SHARD_BYTES` or `FLUSH_SECONDS`, so an interrupted run resumes from its last shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .chunks import npy_header
from .data import Sample, atomic_open, write_json
from .models import model_id
from .render import Encoded, encode, pad_batch

logger = logging.getLogger(__name__)

POSITIONS = ("prompt_last", "last", "response_mean")
CACHE_VERSION = 1  # of the manifest (the shipped features of the guard's rows carry one)
STORE = "rows-v2"
SHARD_BYTES = 64 << 20  # a shard holds about this much float32: 29k rows of width 576, 4k of width 4096
FLUSH_SECONDS = 60.0  # an interrupted run loses at most this much computing
BLOCK_ROWS = 4096  # samples encoded and looked up at a time
KEY = np.dtype("S16")


class Slot:
    """One folder of the store: the shards of one (model weights, layer, position, maximum length) combination,
    with a sorted in-memory index from row key to (shard, row): 28 bytes a row."""

    def __init__(self, root: Path, meta: dict):
        self.meta = meta
        name = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(root) / name
        self.shards: list[str] = []
        self._parts: list[tuple[np.ndarray, int]] = []  # (keys, shard number) per shard, in load order
        self._keys = np.empty(0, KEY)
        self._where = np.empty((0, 2), np.int64)
        self._dirty = False
        self.refresh()

    def _path(self, shard: str, keys: bool = False) -> Path:
        return self.folder / f"{shard}{'.keys' if keys else ''}.npy"

    def _valid(self, shard: str, n: int) -> bool:
        """Whether a shard's data file holds exactly `n` complete rows of this slot's width."""
        path = self._path(shard)
        try:
            shape, _, dtype, offset = npy_header(path)
            width = self.meta.get("width")
            return (len(shape) == 2 and shape[0] == n and (width is None or shape[1] == width)
                    and os.path.getsize(path) == offset + shape[0] * shape[1] * np.dtype(dtype).itemsize)
        except (OSError, ValueError):
            return False

    def refresh(self) -> None:
        """Load the shards other runs (or processes) finished since the last look; drop broken ones."""
        if not self.folder.exists():
            return
        if self.meta.get("width") is None and (self.folder / "slot.json").exists():
            self.meta["width"] = json.loads((self.folder / "slot.json").read_text()).get("width")
        known = set(self.shards)
        for keys_file in sorted(self.folder.glob("shard-*.keys.npy")):
            shard = keys_file.name[: -len(".keys.npy")]
            if shard in known:
                continue
            try:
                keys = np.load(keys_file, allow_pickle=False)
            except (OSError, ValueError):
                keys = None
            if keys is None or keys.dtype != KEY or not self._valid(shard, len(keys)):
                logger.warning("%s: shard %s is incomplete or damaged; its rows will be computed again",
                               self.folder, shard)
                for p in (keys_file, self._path(shard)):
                    p.unlink(missing_ok=True)
                continue
            self._add(shard, keys)

    def _add(self, shard: str, keys: np.ndarray) -> None:
        self.shards.append(shard)
        self._parts.append((keys, len(self.shards) - 1))
        self._dirty = True

    def _index(self) -> None:
        if not self._dirty:
            return
        keys = np.concatenate([k for k, _ in self._parts]) if self._parts else np.empty(0, KEY)
        where = np.concatenate([np.stack([np.full(len(k), s), np.arange(len(k))], 1) for k, s in self._parts]) \
            if self._parts else np.empty((0, 2), np.int64)
        order = np.argsort(keys, kind="stable")
        self._keys, self._where, self._dirty = keys[order], where[order], False

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """(n, 2) (shard number, row) of each key; shard -1 where the store does not have it."""
        self._index()
        out = np.full((len(keys), 2), -1, dtype=np.int64)
        if not len(self._keys):
            return out
        i = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        hit = self._keys[i] == keys
        out[hit] = self._where[i[hit]]
        return out

    def write(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add one shard: data renamed into place first, keys last (the keys file marks a complete shard)."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        if self.meta.get("width") is None:
            self.meta["width"] = values.shape[1]
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "slot.json").exists():
            write_json(self.meta, self.folder / "slot.json")
        shard = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        with atomic_open(self._path(shard), "wb") as f:
            np.save(f, values)
        with atomic_open(self._path(shard, keys=True), "wb") as f:
            np.save(f, np.asarray(keys, dtype=KEY))
        self._add(shard, np.asarray(keys, dtype=KEY))

    def open(self, shard: int) -> np.ndarray:
        return np.load(self._path(self.shards[shard]), mmap_mode="r")

    def gather(self, where: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The rows at `where` ((n, 2) from `lookup`), each shard's memory map opened and closed in turn."""
        out = np.empty((len(where), self.meta["width"]), np.float32) if out is None else out
        order = np.lexsort((where[:, 1], where[:, 0]))
        shards, starts = np.unique(where[order, 0], return_index=True)
        for s, a, b in zip(shards, starts, list(starts[1:]) + [len(order)]):
            idx = order[a:b]
            shard = self.open(int(s))
            out[idx] = shard[where[idx, 1]]
            del shard
        return out


class FeatureMatrix:
    """(n, width) features of one layer and position, read from the store's shards a chunk at a time
    (see `saft.chunks`); `np.asarray` of it gathers every row into memory."""

    def __init__(self, slot: Slot, where: np.ndarray):
        self.slot, self.where = slot, where
        self.shape = (len(where), int(slot.meta["width"]))
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def iter_chunks(self, size: int = 8192) -> Iterator[np.ndarray]:
        for start in range(0, len(self.where), size):
            yield self.slot.gather(self.where[start:start + size])

    def take(self, indices) -> np.ndarray:
        return self.slot.gather(self.where[np.asarray(indices, dtype=np.int64)])

    def __array__(self, dtype=None, copy=None):
        arr = self.slot.gather(self.where)
        return arr if dtype is None else arr.astype(dtype)


@dataclass
class Features:
    """Sample i's hidden state at layer `layers[j]` and position `positions[p]` is `get(layers[j], positions[p])[i]`.

    Rows live in the store's shards (`cache_path`) or, without a cache folder, in memory. `get` gathers one layer
    and position into an (n, d) array; `matrix` gives the same rows as a chunked `FeatureMatrix` for detectors that
    read beyond memory; `values` stacks every layer and position, (n, P, L, d).
    """

    layers: list[int]
    positions: list[str]
    manifest: dict
    n_truncated: int = 0
    cache_path: Path | None = None
    n_computed: int = 0  # rows this call ran through the model (the rest came from the store)
    sources: dict = field(default_factory=dict, repr=False)  # (layer, position) -> ndarray or FeatureMatrix

    def _source(self, layer: int, position: str):
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not extracted; extracted layers: {self.layers}")
        if position not in self.positions:
            raise KeyError(f"position {position!r} was not extracted; extracted: {self.positions}")
        return self.sources[(layer, position)]

    def get(self, layer: int, position: str = "prompt_last") -> np.ndarray:
        """Feature matrix (n, d) float32 for one layer and position."""
        return np.asarray(self._source(layer, position))

    def matrix(self, layer: int, position: str = "prompt_last"):
        """The same rows as `get`, read a chunk at a time when they come from the store."""
        return self._source(layer, position)

    @property
    def values(self) -> np.ndarray:
        return np.stack([np.stack([self.get(l, p) for l in self.layers], 1) for p in self.positions], 1)


class MissingFeatures(LookupError):
    """`extract_features(..., compute_missing=False)` met a row the store lacks (raised at the first such block)."""


class _StopForward(Exception):
    """Raised by a hook once the deepest needed layer has been captured, to skip the rest of the model."""


def num_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def resolve_layers(layers: int | str | Sequence[int | str] | None, n_layers: int) -> list[int]:
    """Accept ints (negative counts from the end, as in Python), "middle", "all", or a list of them."""
    if layers is None:
        layers = "middle"
    if isinstance(layers, (int, str)):
        layers = [layers]
    out: list[int] = []
    for spec in layers:
        if spec == "all":
            out.extend(range(n_layers + 1))
            continue
        if spec == "middle":
            value = n_layers // 2
        else:
            try:
                value = int(spec)
            except (TypeError, ValueError):
                raise ValueError(f"layer {spec!r} is not an integer, 'middle' or 'all'") from None
            if value < 0:
                value += n_layers + 1
        if not 0 <= value <= n_layers:
            raise ValueError(f"layer {spec!r} is out of range: this model has layers 0..{n_layers} "
                             "(0 = embeddings, the last = final output)")
        out.append(value)
    return sorted(set(out))


def _decoder_blocks(model, n_layers: int):
    import torch.nn as nn

    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"cannot find the list of {n_layers} decoder blocks in {type(model).__name__}")


def _model_fingerprint(model) -> str:
    """Hash of the config and a strided sample of every weight: changes whenever the weights change."""
    h = hashlib.sha256(model.config.to_json_string().encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 512)
        h.update(name.encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _data_fingerprint(encoded: list[Encoded]) -> str:
    h = hashlib.sha256()
    for e in encoded:
        h.update(np.asarray(e.ids, dtype=np.int64).tobytes())
        h.update(str(e.prompt_len).encode() + b";")
    return h.hexdigest()[:16]


def _manifest(model, encoded: list[Encoded], layers: list[int], positions: list[str], max_length: int) -> dict:
    return {
        "version": CACHE_VERSION, "model": model_id(model), "model_fingerprint": _model_fingerprint(model),
        "layers": layers, "positions": positions, "max_length": max_length, "n_samples": len(encoded),
        "data_fingerprint": _data_fingerprint(encoded), "n_truncated": sum(e.truncated for e in encoded),
    }


def feature_manifest(model, tokenizer, samples: Sequence[Sample], *, layers=None,
                     positions: Sequence[str] = ("prompt_last",), max_length: int = 512) -> dict:
    """The manifest `extract_features` would write for these arguments (model, layers, positions, max length
    and fingerprints of the weights and the tokenised data), without running the model."""
    layers = resolve_layers(layers, num_layers(model))
    encoded = [encode(s, tokenizer, max_length=max_length) for s in samples]
    return _manifest(model, encoded, layers, list(positions), max_length)


def _pool(hidden, input_lens, prompt_lens, positions: Sequence[str]):
    """hidden: (B, T, d) -> (B, P, d) for each position."""
    import torch

    B, T, _ = hidden.shape
    rows = torch.arange(B)
    out = []
    for pos in positions:
        if pos == "prompt_last":
            out.append(hidden[rows, (prompt_lens - 1).clamp(min=0)])
        elif pos == "last":
            out.append(hidden[rows, input_lens - 1])
        else:  # response_mean; an empty response falls back to the last prompt token
            t = torch.arange(T)[None, :]
            mask = (t >= prompt_lens[:, None]) & (t < input_lens[:, None])
            empty = mask.sum(1) == 0
            mask[empty, (prompt_lens[empty] - 1).clamp(min=0)] = True
            m = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
            out.append((hidden * m).sum(1) / m.sum(1))
    return torch.stack(out, 1)


def _forward_batch(model, blocks, layers: list[int], n_layers: int, batch: list[Encoded], pad_id: int,
                   positions: Sequence[str]) -> np.ndarray:
    """(B, P, L, d) features of one batch, running the model only as deep as needed."""
    import torch

    device = next(model.parameters()).device
    ids, attn = pad_batch([e.ids for e in batch], pad_id, side="right")
    input_lens = attn.sum(1)
    prompt_lens = torch.tensor([e.prompt_len for e in batch])
    captured: dict[int, object] = {}
    deepest = max(layers)

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            captured[layer] = args[0] if args else kwargs["hidden_states"]
            if layer == deepest:
                raise _StopForward
        return hook

    handles = [blocks[l].register_forward_pre_hook(make_hook(l), with_kwargs=True) for l in layers if l < n_layers]
    base = getattr(model, model.base_model_prefix, model)
    try:
        with torch.inference_mode():
            try:
                out = base(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
                if n_layers in layers:
                    captured[n_layers] = out.last_hidden_state
            except _StopForward:
                pass
            feats = [_pool(captured[l].float().cpu(), input_lens, prompt_lens, positions) for l in layers]
    finally:
        for h in handles:
            h.remove()
    return torch.stack(feats, 2).numpy()  # (B, P, L, d)


def row_keys(encoded: Sequence[Encoded]) -> np.ndarray:
    """The store's key of each encoded row: a hash of its token ids and prompt length (the slot names the rest)."""
    keys = [hashlib.sha256(np.asarray(e.ids, dtype=np.int64).tobytes() + f";{e.prompt_len}".encode()).digest()[:16]
            for e in encoded]
    return np.array(keys, dtype=KEY)


def _slots(root: Path, model, layers: list[int], positions: list[str], max_length: int,
           fingerprint: str | None = None) -> dict:
    fingerprint = fingerprint or _model_fingerprint(model)
    return {(l, p): Slot(root, {"store": 2, "model": model_id(model), "model_fingerprint": fingerprint, "layer": l,
                                "position": p, "max_length": max_length})
            for l in layers for p in positions}


def _check_args(positions, max_length: int, batch_size: int) -> list[str]:
    positions = [positions] if isinstance(positions, str) else list(positions)
    for p in positions:
        if p not in POSITIONS:
            raise ValueError(f"unknown position {p!r}; choose from {', '.join(POSITIONS)}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return positions


class _Writer:
    """Rows computed for one slot, buffered and flushed as one shard when big or old enough."""

    def __init__(self, slot: Slot):
        self.slot, self.keys, self.rows, self.pending = slot, [], [], set()

    def add(self, key: bytes, row: np.ndarray) -> None:
        self.keys.append(key)
        self.rows.append(row)
        self.pending.add(key)

    def flush(self) -> None:
        if self.keys:
            self.slot.write(np.array(self.keys, dtype=KEY), np.stack(self.rows))
        self.keys, self.rows, self.pending = [], [], set()


def _sample_blocks(samples) -> Iterator[tuple[int, list[Sample]]]:
    """(first position, samples) of consecutive blocks of `BLOCK_ROWS`: sliced from a list, read in one pass from
    a collection that gives its samples afresh when iterated (a `saft.data.StreamedDataset`)."""
    if isinstance(samples, Sequence):
        for start in range(0, len(samples), BLOCK_ROWS):
            yield start, samples[start:start + BLOCK_ROWS]
        return
    block, start = [], 0
    for sample in samples:
        block.append(sample)
        if len(block) == BLOCK_ROWS:
            yield start, block
            start, block = start + len(block), []
    if block:
        yield start, block


def extract_features(model, tokenizer, samples: Sequence[Sample], *, layers=None,
                     positions: str | Sequence[str] = "prompt_last", max_length: int = 512, batch_size: int = 8,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     compute_missing: bool = True) -> Features:
    """Hidden states of `samples` at `layers` and `positions`; see the module docstring. `samples`: a list, or a
    sized collection that gives its samples afresh when iterated (a `saft.data.StreamedDataset`, read in one pass
    a block at a time, so that memory does not grow with the rows when the features go to the store).

    With `cache_dir`, rows live in the store under `cache_dir/rows-v2/`, found by content: only rows no earlier
    run computed for this model, layer, position and maximum length are run through the model. With
    `compute_missing=False` nothing is computed: the first block holding a row the store lacks raises
    `MissingFeatures` (the Ray engine's check that its workers left nothing to do).
    """
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("no samples to extract features from")
    positions = _check_args(positions, max_length, batch_size)
    if not compute_missing and cache_dir is None:
        raise ValueError("compute_missing=False needs a cache_dir to read the rows from")
    n_layers = num_layers(model)
    layers = resolve_layers(layers, n_layers)
    n = len(samples)
    root = Path(cache_dir) / STORE if cache_dir is not None else None
    fingerprint = _model_fingerprint(model)
    slots = _slots(root, model, layers, positions, max_length, fingerprint) if root is not None else {}
    writers = {k: _Writer(slot) for k, slot in slots.items()}
    arrays: dict = {}  # without a store: (layer, position) -> (n, d) array
    keys_all = np.empty(n, dtype=KEY) if slots else None
    data_hash, n_truncated = hashlib.sha256(), 0
    blocks = _decoder_blocks(model, n_layers)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=n, disable=not progress, desc="features", unit="sample")
    last_flush, n_computed = time.monotonic(), 0
    for start, block in _sample_blocks(samples):
        encoded = [encode(s, tokenizer, max_length=max_length) for s in block]
        for e in encoded:
            data_hash.update(np.asarray(e.ids, dtype=np.int64).tobytes())
            data_hash.update(str(e.prompt_len).encode() + b";")
        n_truncated += sum(e.truncated for e in encoded)
        if slots:
            keys = row_keys(encoded)
            keys_all[start:start + len(encoded)] = keys
            missing = {k: (slot.lookup(keys)[:, 0] < 0) & np.array([x not in writers[k].pending for x in keys])
                       for k, slot in slots.items()}
            need = np.logical_or.reduce(list(missing.values()))
            _, first = np.unique(keys, return_index=True)  # a row repeated in the block is computed once
            todo = [i for i in np.sort(first) if need[i]]
            if todo and not compute_missing:
                bar.close()
                raise MissingFeatures(f"{root}: rows {start + todo[0]}.. (at least {len(todo)}) are not stored")
        else:
            todo = list(range(len(encoded)))
        bar.update(len(encoded) - len(todo))
        todo.sort(key=lambda i: -len(encoded[i].ids))
        for b in range(0, len(todo), batch_size):
            idx = todo[b:b + batch_size]
            out = _forward_batch(model, blocks, layers, n_layers, [encoded[i] for i in idx], pad_id, positions)
            for p, pos in enumerate(positions):
                for j, layer in enumerate(layers):
                    if slots:
                        for r, i in enumerate(idx):
                            if missing[(layer, pos)][i]:
                                writers[(layer, pos)].add(keys[i], out[r, p, j])
                    else:
                        if (layer, pos) not in arrays:
                            arrays[(layer, pos)] = np.empty((n, out.shape[-1]), dtype=np.float32)
                        arrays[(layer, pos)][[start + i for i in idx]] = out[:, p, j]
            n_computed += len(idx)
            bar.update(len(idx))
            full = any(len(w.keys) * out.shape[-1] * 4 >= SHARD_BYTES for w in writers.values())
            if full or time.monotonic() - last_flush > FLUSH_SECONDS:
                for w in writers.values():
                    w.flush()
                last_flush = time.monotonic()
    bar.close()
    for w in writers.values():
        w.flush()
    manifest = {"version": CACHE_VERSION, "model": model_id(model), "model_fingerprint": fingerprint,
                "layers": layers, "positions": positions, "max_length": max_length, "n_samples": n,
                "data_fingerprint": data_hash.hexdigest()[:16], "n_truncated": n_truncated}
    if slots:
        logger.info("features: %d of %d rows computed, the rest read from %s", n_computed, n, root)
        sources = {}
        for k, slot in slots.items():
            where = slot.lookup(keys_all)
            if (where[:, 0] < 0).any():  # only if shards vanished under us (a user cleaning the cache mid-run)
                raise RuntimeError(f"{slot.folder}: {(where[:, 0] < 0).sum()} rows just written are missing; "
                                   "is another process deleting the cache? Run again to recompute them.")
            sources[k] = FeatureMatrix(slot, where)
        return Features(layers, positions, manifest, n_truncated, root, n_computed, sources)
    return Features(layers, positions, manifest, n_truncated, None, n_computed, arrays)


def missing_rows(model, tokenizer, samples: Sequence[Sample], *, layers, positions: Sequence[str],
                 max_length: int, cache_dir: str | os.PathLike) -> np.ndarray:
    """Positions in `samples` of the rows some slot of the store under `cache_dir` lacks (each distinct row
    once: a row repeated in `samples` is named at its first position)."""
    positions = _check_args(positions, max_length, 1)
    slots = _slots(Path(cache_dir) / STORE, model, resolve_layers(layers, num_layers(model)), list(positions),
                   max_length)
    for slot in slots.values():
        slot.refresh()  # shards other processes (Ray workers) wrote since the slot was read
    keys = np.concatenate([np.empty(0, KEY)] + [row_keys([encode(s, tokenizer, max_length=max_length) for s in block])
                                                 for _, block in _sample_blocks(samples)])
    need = np.logical_or.reduce([slot.lookup(keys)[:, 0] < 0 for slot in slots.values()])
    _, first = np.unique(keys, return_index=True)
    return np.sort(first[need[first]])


def store_features(model, tokenizer, samples: Sequence[Sample], values: np.ndarray, *, layers: Sequence[int],
                   positions: Sequence[str], max_length: int, cache_dir: str | os.PathLike) -> int:
    """Put features computed elsewhere (`values`: (n, P, L, d) in `positions` x `layers` order) into the store
    under the keys `extract_features` will look up for these rows; rows it already has are skipped. The caller
    vouches that they are this model's at these settings. Returns the number of rows written per slot."""
    positions = _check_args(positions, max_length, 1)
    layers = list(layers)
    if values.shape[:3] != (len(samples), len(positions), len(layers)):
        raise ValueError(f"values have shape {values.shape}, expected ({len(samples)}, {len(positions)}, "
                         f"{len(layers)}, d)")
    keys = row_keys([encode(s, tokenizer, max_length=max_length) for s in samples])
    slots = _slots(Path(cache_dir) / STORE, model, layers, positions, max_length)
    written = 0
    for p, pos in enumerate(positions):
        for j, layer in enumerate(layers):
            slot = slots[(layer, pos)]
            _, first = np.unique(keys, return_index=True)
            new = np.sort(first[slot.lookup(keys[first])[:, 0] < 0])
            rows_per_shard = max(1, SHARD_BYTES // (values.shape[-1] * 4))
            for a in range(0, len(new), rows_per_shard):
                part = new[a:a + rows_per_shard]
                slot.write(keys[part], values[part, p, j].astype(np.float32))
            written = max(written, len(new))
    return written
