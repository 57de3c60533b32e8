"""Hidden-state features of samples: chosen layers, chosen token positions, cached on disk.

Layer numbering follows transformers' `hidden_states`: 0 is the embedding output, layer l (1 <= l < L) the
residual stream after decoder block l, and L the final (normed) output, as the paper counts (15 of 32 on
Llama-2). Positions:
- `prompt_last`: the last token before the response starts (the paper's; it sees only the prompt);
- `last`: the last token of the sequence;
- `response_mean`: the mean over response tokens.

One forward pass serves every requested layer and position. The pass stops after the deepest layer needed
(a pre-hook on the next block raises) and never runs the LM head. Batches are sorted by length so padding is
small. Each finished batch is saved under the cache folder (`.npy`, no pickle) with a manifest, so a rerun
reuses the result and an interrupted run resumes from its last finished batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import Sample, atomic_open, write_json
from .models import model_id
from .render import Encoded, encode, pad_batch

logger = logging.getLogger(__name__)

POSITIONS = ("prompt_last", "last", "response_mean")
CACHE_VERSION = 1


@dataclass
class Features:
    """`values[i, p, j]` is sample i's hidden state at position `positions[p]` and layer `layers[j]`."""

    values: np.ndarray  # (n, P, L, d) float32
    layers: list[int]
    positions: list[str]
    manifest: dict
    n_truncated: int = 0
    cache_path: Path | None = None

    def get(self, layer: int, position: str = "prompt_last") -> np.ndarray:
        """Feature matrix (n, d) for one layer and position."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not extracted; extracted layers: {self.layers}")
        if position not in self.positions:
            raise KeyError(f"position {position!r} was not extracted; extracted: {self.positions}")
        return self.values[:, self.positions.index(position), self.layers.index(layer)]


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


def cache_key(manifest: dict) -> str:
    """The cache folder name of a feature manifest: equal manifests share a folder, so features computed
    elsewhere for the same manifest (shipped with the package, say) can be placed where extract_features looks."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]


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


def extract_features(model, tokenizer, samples: Sequence[Sample], *, layers=None,
                     positions: str | Sequence[str] = "prompt_last", max_length: int = 512, batch_size: int = 8,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Features:
    """Hidden states of `samples` at `layers` and `positions`; see the module docstring.

    With `cache_dir`, results live in `cache_dir/<key>/` where the key hashes the model, layers, positions,
    max length and the tokenised data; finished batches are reused after an interruption.
    """
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("no samples to extract features from")
    positions = [positions] if isinstance(positions, str) else list(positions)
    for p in positions:
        if p not in POSITIONS:
            raise ValueError(f"unknown position {p!r}; choose from {', '.join(POSITIONS)}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n_layers = num_layers(model)
    layers = resolve_layers(layers, n_layers)
    encoded = [encode(s, tokenizer, max_length=max_length) for s in samples]
    manifest = _manifest(model, encoded, layers, positions, max_length)
    n_truncated = manifest["n_truncated"]
    folder = Path(cache_dir) / cache_key(manifest) if cache_dir is not None else None
    if folder is not None and (folder / "features.npy").exists():
        logger.info("reusing cached features from %s", folder)
        values = np.load(folder / "features.npy", allow_pickle=False)
        return Features(values, layers, positions, manifest, n_truncated, folder)

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].ids))
    spans = [(s, min(s + batch_size, len(order))) for s in range(0, len(order), batch_size)]
    parts: dict[tuple[int, int], np.ndarray] = {}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(manifest, folder / "manifest.json")
        for s, e in spans:
            part = folder / f"part-{s:08d}-{e:08d}.npy"
            if part.exists():
                parts[(s, e)] = np.load(part, allow_pickle=False)
        if parts:
            logger.info("resuming: %d of %d batches already in %s", len(parts), len(spans), folder)
    blocks = _decoder_blocks(model, n_layers)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    todo = [sp for sp in spans if sp not in parts]
    bar = tqdm(total=len(samples), initial=len(samples) - sum(e - s for s, e in todo), disable=not progress,
               desc="features", unit="sample")
    for s, e in todo:
        batch = [encoded[i] for i in order[s:e]]
        parts[(s, e)] = _forward_batch(model, blocks, layers, n_layers, batch, pad_id, positions)
        if folder is not None:
            with atomic_open(folder / f"part-{s:08d}-{e:08d}.npy", "wb") as f:
                np.save(f, parts[(s, e)])
        bar.update(e - s)
    bar.close()
    d = next(iter(parts.values())).shape[-1]
    values = np.empty((len(samples), len(positions), len(layers), d), dtype=np.float32)
    for (s, e), arr in parts.items():
        values[order[s:e]] = arr
    if folder is not None:
        with atomic_open(folder / "features.npy", "wb") as f:
            np.save(f, values)
        for part in folder.glob("part-*.npy"):
            part.unlink()
    return Features(values, layers, positions, manifest, n_truncated, folder)
