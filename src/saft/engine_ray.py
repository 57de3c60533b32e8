"""Hidden-state features on a Ray cluster: `saft filter --engine ray` (install with `pip install 'saft-llm[ray]'`).

`extract_with_ray` fills the feature store (`saft.features`) from a pool of Ray actors, each loading the model once,
one per GPU (or, on a cluster without GPUs, one per `CPUS_PER_WORKER` CPUs), and running `extract_features` on
the batches Ray Data hands it. Each actor writes its rows into the same store as whole shards, the way two local
processes share one, and computes only the rows the store lacks; the driver then reads every row from the store
(it runs no forward pass) and the detector's fit, the selection and the outputs run there as with the local
engine. The store must therefore be one folder every node sees (a shared file system); rows the driver cannot
see after the run are an error, not a silent recomputation on the driver.

Ray Data reads a JSONL or Parquet input itself, in its read tasks (`_JsonlSamples`: one task per JSONL file,
read a MiB at a time; `ray.data.read_parquet`), and each row is parsed there by saft's own row parser
(`saft.data.parse_records`), so a worker's sample is the driver's to the token. The driver parses the file too,
in its own streaming pass: ids, labels and invalid rows come from that pass, and it needs the rows to fit, select
and write. CSV (whose quoting rules differ between readers), JSON lists and `datasets` folders, and the extra rows
a detector needs (the guard's reference rows, a labels file), go to the workers from the driver's parse
(`ray.data.from_items`).

The actors load the model by name or folder (never pickled weights), in the driver's dtype, so their weights'
fingerprint, which names the store's slot, is the driver's; a worker whose weights differ (another model folder on
its node) is reported. The driver still loads the model, for that fingerprint and the tokeniser.
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

from .data import Sample, StreamedDataset, jsonl_records, parse_records
from .features import BLOCK_ROWS, STORE, Features, MissingFeatures, _model_fingerprint, extract_features, missing_rows

logger = logging.getLogger(__name__)

INSTALL = "pip install 'saft-llm[ray]'"
CPUS_PER_WORKER = 4  # on a cluster without GPUs, one worker per this many CPUs unless --ray-workers says
CALLS_PER_WORKER = 4  # batches per actor at least, so that the pool's actors share the rows evenly
RAY_FORMATS = ("jsonl", "parquet")  # inputs Ray Data reads itself; the others go from the driver's parse
READ_BLOCK_ROWS = 1024  # samples a Ray Data block of the input holds


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
        samples = [Sample(id=str(i), messages=json.loads(m)) for i, m in enumerate(batch["messages"])]
        f = extract_features(self.model, self.tokenizer, samples, cache_dir=self.feature_cache, progress=False,
                             **self.kw)
        return {"rows": np.array([len(samples)]), "computed": np.array([f.n_computed]),
                "fingerprint": np.array([self.fingerprint]), "node": np.array([os.uname().nodename])}


def _messages_block(samples: list[Sample]):
    import pyarrow as pa

    return pa.table({"messages": pa.array([json.dumps(s.messages) for s in samples], type=pa.string())})


def _lines(f, size: int = 1 << 20):
    """The lines of a binary stream, each with its "\n", read `size` bytes at a time (Arrow's input streams,
    which Ray Data hands a datasource, do not iterate by line)."""
    rest = b""
    while chunk := f.read(size):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part + b"\n"
    if rest:
        yield rest


def _jsonl_datasource(fields):
    """A Ray Data datasource reading JSONL files a line at a time into blocks of samples' messages (the class is
    made here, so that importing this module does not import Ray)."""
    from ray.data.datasource import FileBasedDatasource

    class _JsonlSamples(FileBasedDatasource):
        def __init__(self, paths):
            super().__init__(paths)
            self.fields = fields

        def _read_stream(self, f, path: str):
            block = []
            for sample in parse_records(jsonl_records(_lines(f)), path=path, format="jsonl", fields=self.fields):
                block.append(sample)
                if len(block) == READ_BLOCK_ROWS:
                    yield _messages_block(block)
                    block = []
            if block:
                yield _messages_block(block)

    return _JsonlSamples


def _parquet_messages(batch, *, path: str, fields):
    records = ((i + 1, row, None) for i, row in enumerate(batch.to_pylist()))
    return _messages_block(list(parse_records(records, path=path, format="parquet", fields=fields)))


def _read_input(ray, source: StreamedDataset):
    """The input file as a Ray Data dataset of rows' messages, read and parsed by Ray's read tasks."""
    path = str(source.path)
    if source.format == "jsonl":
        return ray.data.read_datasource(_jsonl_datasource(source.fields)(path))
    return ray.data.read_parquet(path).map_batches(_parquet_messages, batch_format="pyarrow",
                                                   fn_kwargs={"path": path, "fields": source.fields})


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
    # A CPU stays free for Ray Data's read tasks: actors holding every CPU would wait for rows no task can read.
    share = min(1.0, (cpus - 1) / n) if cpus > 1 else 0.5
    return {"workers": n, "device": "cpu", "num_gpus": 0, "num_cpus": share, "threads": max(1, cpus // n)}


def extract_with_ray(samples: Sequence[Sample], model, tokenizer, *, config, positions: Sequence[str],
                     cache_dir: str | os.PathLike, also: Sequence[Sample] = (), source=None,
                     progress: bool = True) -> tuple[Features, dict]:
    """The hidden states of `samples` (at `config.layer`, `positions`, `config.max_length`), as `extract_features`
    gives them, computed by a pool of Ray actors into the feature store under `cache_dir` (the pipeline's feature
    folder), together with the rows `also` (needed later; they are only stored).

    `source`: the `StreamedDataset` that `samples` were parsed from, when Ray Data may read its file itself
    (JSONL, Parquet); otherwise the rows go to the actors from `samples`. Connects to `config.ray_address` (e.g.
    "auto"), or uses the Ray session already started in this process, or starts a local one (shut down again at
    the end); when every row is stored already, no Ray session and no worker is started. `model`/`tokenizer` are
    the driver's copy; the actors load `config.model` themselves in the same dtype. Returns the features and
    counts for the log: rows, rows sent from the driver, rows the workers computed, workers and their device.
    """
    kw = dict(layers=[config.layer], positions=list(positions), max_length=config.max_length,
              batch_size=config.batch_size, cache_dir=cache_dir)
    stats = {"rows": len(samples) + len(also), "sent": 0, "computed": 0, "workers": 0, "device": None}

    def stored() -> Features:  # the rows from the store, none computed: MissingFeatures when one is not there
        if also:
            extract_features(model, tokenizer, also, compute_missing=False, progress=False, **kw)
        return extract_features(model, tokenizer, samples, compute_missing=False, progress=progress, **kw)

    try:
        features = stored()
        logger.info("ray: every row is already in %s; no workers started", cache_dir)
        return features, stats
    except MissingFeatures:
        pass
    ray = require_ray()
    readable = isinstance(source, StreamedDataset) and source.format in RAY_FORMATS
    started = not ray.is_initialized()
    if started:
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # saft's own bar
        ctx.print_on_execution_start = False
        sent = list(also) if readable else list(samples) + list(also)
        _run_pool(ray, _read_input(ray, source) if readable else None, sent, model, config=config,
                  positions=positions, cache_dir=cache_dir, stats=stats, progress=progress)
        try:
            return stored(), stats
        except MissingFeatures:
            if not readable:
                raise _lost(cache_dir, stats) from None
        # Rows Ray's reader gave otherwise than the driver's parse (an input saft's parser reads in another
        # way than the tests foresaw): sent from the driver's parse, so the run is right either way.
        todo = missing_rows(model, tokenizer, samples, layers=[config.layer], positions=positions,
                            max_length=config.max_length, cache_dir=cache_dir)
        logger.warning("ray: %d rows Ray Data read were not the driver's; sending them from the driver", len(todo))
        _run_pool(ray, None, [samples[i] for i in todo], model, config=config, positions=positions,
                  cache_dir=cache_dir, stats=stats, progress=progress)
    finally:
        if started:
            ray.shutdown()
    try:
        return stored(), stats
    except MissingFeatures:
        raise _lost(cache_dir, stats) from None


def _lost(cache_dir, stats: dict) -> ValueError:
    return ValueError(f"rows the Ray workers computed are not in {Path(cache_dir) / STORE} as the driver sees it "
                      f"(workers ran on {', '.join(sorted(stats.get('nodes', ()))) or 'no node'}): on a cluster of "
                      "several machines, --cache-dir must be a folder on storage every node shares (NFS, a "
                      "mounted bucket)")


def _run_pool(ray, pool, sent: list[Sample], model, *, config, positions, cache_dir, stats: dict,
              progress: bool) -> None:
    """Run the actor pool over the dataset `pool` (None: nothing) and the rows `sent`; add to `stats`."""
    from tqdm.auto import tqdm

    plan = _plan(ray, config.ray_workers)
    stats.update(workers=plan["workers"], device=plan["device"])
    stats["sent"] += len(sent)
    total = stats["rows"] if pool is not None else len(sent)
    per_call = max(config.batch_size, min(BLOCK_ROWS, math.ceil(total / (plan["workers"] * CALLS_PER_WORKER))))
    parts = [] if pool is None else [pool]
    if sent:
        items = [{"messages": json.dumps(s.messages)} for s in sent]
        parts.append(ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_call)))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    out = ds.map_batches(
        _Extractor, batch_size=per_call, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=plan["workers"]),
        num_gpus=plan["num_gpus"], num_cpus=plan["num_cpus"],
        fn_constructor_kwargs=dict(model=config.model, model_cache=config.cache_dir, feature_cache=str(cache_dir),
                                   device=plan["device"], dtype=dtype, trust_remote_code=config.trust_remote_code,
                                   layer=config.layer, positions=list(positions), max_length=config.max_length,
                                   batch_size=config.batch_size, threads=plan["threads"]))
    logger.info("ray: %s%d rows from the driver to %d workers on %s, %d rows a batch",
                "the input read by Ray Data and " if pool is not None else "", len(sent), plan["workers"],
                plan["device"], per_call)
    bar = tqdm(total=total, disable=not progress, desc="features (ray)", unit="sample")
    others, nodes = set(), stats.setdefault("nodes", set())
    fingerprint = _model_fingerprint(model)
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
    if others:
        raise ValueError(f"the Ray workers loaded other weights for {config.model!r} than the driver (weights "
                         f"fingerprint {', '.join(sorted(others))}, the driver's {fingerprint}): every node must see "
                         "the same model folder, or the same hub revision")
    logger.info("ray: %d rows computed by %d workers", stats["computed"], stats["workers"])
