"""Hidden-state features on a Ray cluster: `saft filter --engine ray` (install with `pip install 'saft-llm[ray]'`).

`extract_with_ray` fills the feature store (`saft.features`) from a pool of Ray actors, each loading the model once,
one per GPU (or, on a cluster without GPUs, one per `CPUS_PER_WORKER` CPUs), and running `extract_features` on
the batches Ray Data hands it. Each actor writes its rows into the same store as whole shards, the way two local
processes share one, so the pipeline's own `extract_features` call that follows finds every row there and computes
nothing; the detector's fit, the selection and the outputs then run on the driver as with the local engine. The
store must therefore be one folder every node sees (a shared file system); rows the driver cannot see after the
run are an error, not a silent local recomputation.

The driver parses the input with saft's own reader (`saft.data`), not Ray Data's readers: ids, labels, schema
detection and invalid-row handling then behave exactly as with the local engine, and the driver needs the parsed
rows anyway to fit, select and write. Ray Data distributes what costs: the rows the store lacks go to the actors as
a dataset of chat messages (`ray.data.from_items`), tokenised and run through the model there.

The actors load the model by name or folder (never pickled weights), in the driver's dtype, so their weights'
fingerprint, which names the store's slot, is the driver's; a worker whose weights differ (another model folder on
its node) is reported. The driver still loads the model, for that fingerprint and the tokeniser; it runs no
forward pass when the workers' rows reach it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import Sample
from .features import (
    BLOCK_ROWS, STORE, _model_fingerprint, _slots, extract_features, num_layers, resolve_layers, row_keys,
)
from .render import encode

logger = logging.getLogger(__name__)

INSTALL = "pip install 'saft-llm[ray]'"
CPUS_PER_WORKER = 4  # on a cluster without GPUs, one worker per this many CPUs unless --ray-workers says
CALLS_PER_WORKER = 4  # batches per actor at least, so that the pool's actors share the rows evenly


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def require_ray():
    if not ray_available():
        raise ValueError(f"--engine ray needs Ray, which is not installed: {INSTALL}")
    import ray

    return ray


class _Extractor:
    """A Ray actor: one model, loaded once, turning batches of rows into store shards."""

    def __init__(self, *, model: str, model_cache: str | None, feature_cache: str, device: str, dtype: str,
                 trust_remote_code: bool, layer, positions: list[str], max_length: int, batch_size: int,
                 threads: int | None):
        import torch

        from .models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tokenizer = load_model(model, cache_dir=model_cache, device=device, dtype=dtype,
                                                trust_remote_code=trust_remote_code)
        self.fingerprint = _model_fingerprint(self.model)
        self.feature_cache = feature_cache
        self.kw = dict(layers=[layer], positions=positions, max_length=max_length, batch_size=batch_size)

    def __call__(self, batch: dict) -> dict:
        samples = [Sample(id=str(i), messages=json.loads(m)) for i, m in zip(batch["row"], batch["messages"])]
        f = extract_features(self.model, self.tokenizer, samples, cache_dir=self.feature_cache, progress=False,
                             **self.kw)
        return {"rows": np.array([len(samples)]), "computed": np.array([f.n_computed]),
                "fingerprint": np.array([self.fingerprint]), "node": np.array([os.uname().nodename])}


def _cause(error: BaseException) -> str:
    """The worker's own exception behind a Ray error: Ray puts the worker's traceback in its message, whose last
    `Name: message` line is the original error (a ModelError from the actor's constructor, ...)."""
    lines = str(error).strip().splitlines()
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
    if not raised:
        return lines[0] if lines else type(error).__name__
    return re.sub(r"^[\w.]*\.", "", raised[-1])  # saft.models.ModelError: ... -> ModelError: ...


def _plan(ray, workers: int | None) -> dict:
    """How many actors, and what each one asks of the cluster: a GPU each when the cluster has GPUs."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus:
        n = workers or gpus
        if n > gpus:
            raise ValueError(f"--ray-workers {n}: the Ray cluster has {gpus} GPUs, and each worker takes one")
        return {"workers": n, "device": "cuda", "num_gpus": 1, "num_cpus": 1, "threads": None}
    n = workers or max(1, cpus // CPUS_PER_WORKER)
    if n > max(cpus, 1):
        raise ValueError(f"--ray-workers {n}: the Ray cluster has {cpus} CPUs and no GPU; each worker takes a CPU")
    return {"workers": n, "device": "cpu", "num_gpus": 0, "num_cpus": 1, "threads": max(1, cpus // n)}


def extract_with_ray(samples: Sequence[Sample], model, tokenizer, *, config, positions: Sequence[str],
                     cache_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Put the hidden states of `samples` (at `config.layer`, `positions`, `config.max_length`) into the feature
    store under `cache_dir` (the pipeline's feature folder), computed by a pool of Ray actors.

    Connects to `config.ray_address` (e.g. "auto"), or uses the Ray session already started in this process, or
    starts a local one (shut down again at the end). Only rows the store lacks are sent. `model`/`tokenizer` are
    the driver's copy; the actors load `config.model` themselves in the same dtype. Returns counts for the
    summary: rows, rows sent, rows the workers computed, workers and the device they ran on.
    """
    from tqdm.auto import tqdm

    ray = require_ray()
    layers = resolve_layers([config.layer], num_layers(model))
    positions = list(positions)
    fingerprint = _model_fingerprint(model)
    slots = _slots(Path(cache_dir) / STORE, model, layers, positions, config.max_length, fingerprint)
    keys = np.concatenate([row_keys([encode(s, tokenizer, max_length=config.max_length)
                                     for s in samples[a:a + BLOCK_ROWS]]) for a in range(0, len(samples), BLOCK_ROWS)])

    def missing() -> np.ndarray:
        for slot in slots.values():
            slot.refresh()
        return np.logical_or.reduce([slot.lookup(keys)[:, 0] < 0 for slot in slots.values()])

    need = missing()
    _, first = np.unique(keys, return_index=True)  # a row repeated in the data is sent once
    todo = np.sort(first[need[first]])
    stats = {"rows": len(samples), "sent": int(len(todo)), "computed": 0, "workers": 0, "device": None}
    if not len(todo):
        logger.info("ray: every row is already in %s; no workers started", cache_dir)
        return stats
    started = not ray.is_initialized()
    if started:
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False)
    try:
        plan = _plan(ray, config.ray_workers)
        stats.update(workers=plan["workers"], device=plan["device"])
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # saft's own bar below
        ctx.print_on_execution_start = False
        per_call = max(config.batch_size, min(BLOCK_ROWS, math.ceil(len(todo) / (plan["workers"] * CALLS_PER_WORKER))))
        items = [{"row": int(i), "messages": json.dumps(samples[i].messages)} for i in todo]
        ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_call))
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        out = ds.map_batches(
            _Extractor, batch_size=per_call, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=plan["workers"]),
            num_gpus=plan["num_gpus"], num_cpus=plan["num_cpus"],
            fn_constructor_kwargs=dict(model=config.model, model_cache=config.cache_dir, feature_cache=str(cache_dir),
                                       device=plan["device"], dtype=dtype,
                                       trust_remote_code=config.trust_remote_code, layer=config.layer,
                                       positions=positions, max_length=config.max_length,
                                       batch_size=config.batch_size, threads=plan["threads"]))
        logger.info("ray: %d rows to %d workers on %s, %d rows a batch", len(todo), plan["workers"], plan["device"],
                    per_call)
        bar = tqdm(total=len(todo), disable=not progress, desc="features (ray)", unit="sample")
        others, nodes = set(), set()
        try:
            for row in out.iter_rows():
                bar.update(int(row["rows"]))
                stats["computed"] += int(row["computed"])
                nodes.add(str(row["node"]))
                if str(row["fingerprint"]) != fingerprint:
                    others.add(str(row["fingerprint"]))
        except ray.exceptions.RayError as e:  # a worker's own error (a model it cannot load, ...), not Ray's trace
            raise ValueError(f"a Ray worker failed: {_cause(e)}") from e
        finally:
            bar.close()
    finally:
        if started:
            ray.shutdown()
    if others:
        raise ValueError(f"the Ray workers loaded other weights for {config.model!r} than the driver (weights "
                         f"fingerprint {', '.join(sorted(others))}, the driver's {fingerprint}): every node must see "
                         "the same model folder, or the same hub revision")
    lost = int(missing().sum())
    if lost:
        raise ValueError(f"{lost} rows the Ray workers computed are not in {Path(cache_dir) / STORE} as the driver "
                         f"sees it (workers ran on {', '.join(sorted(nodes))}): on a cluster of several machines, "
                         "--cache-dir must be a folder on storage every node shares (NFS, a mounted bucket)")
    logger.info("ray: %d rows computed by %d workers", stats["computed"], stats["workers"])
    return stats
