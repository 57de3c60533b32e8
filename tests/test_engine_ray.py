"""`--engine ray`: a local Ray cluster on two CPUs with two workers and the tiny model; its scores must be the local
engine's, its outputs must cover the input, and the driver must compute no row itself (the workers' shards are in
the store)."""

import json
import os
import shutil
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import toy_rows, write_jsonl
from saft.data import Sample
from saft.pipeline import FilterConfig

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    """Two CPUs, no dashboard, every file Ray writes under one temporary folder (short: it holds Unix sockets),
    and no auth token written into HOME."""
    temp = tempfile.mkdtemp(prefix="saft-ray-")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def tiny_reference(monkeypatch):
    """Every 100th of the guard's reference rows (both classes): the label-free detector trains on them, and their
    sentence view (run on the driver by either engine) is what this test would otherwise spend most of its time on."""
    import saft.reference as R

    subset = R.reference_samples()[::100]
    assert {s.label for s in subset} == {0, 1}
    monkeypatch.setattr(R, "reference_samples", lambda: subset)
    return subset


def read_jsonl(p):
    return [json.loads(line) for line in p.read_text().splitlines()]


def test_ray_engine_matches_the_local_engine(ray_session, tiny_model_dir, tmp_path, monkeypatch, tiny_reference):
    import saft.features as F
    from saft.cli import main
    from saft.engine_ray import extract_with_ray
    from saft.models import load_model

    rows = toy_rows(30)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    forward = F._forward_batch
    driver_rows = []  # rows this process (the driver) runs through the model; the workers are other processes

    def counting(model, blocks, layers, n_layers, batch, *args):
        driver_rows.append(len(batch))
        return forward(model, blocks, layers, n_layers, batch, *args)

    monkeypatch.setattr(F, "_forward_batch", counting)
    # The label-free detector: the pool's rows and the guard's reference rows both go through the workers.
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--detector", "label-free", "--rule", "fraction",
              "--fraction", "0.2"]
    import saft.engine_ray as E

    sent = []  # (Ray Data read the input, rows sent from the driver) of each actor-pool pass
    run_pool = E._run_pool

    def recording(ray, pool, rows_sent, *args, **kw):
        sent.append((pool is not None, len(rows_sent)))
        return run_pool(ray, pool, rows_sent, *args, **kw)

    monkeypatch.setattr(E, "_run_pool", recording)
    assert main(["-q", "filter", str(data), "-o", str(tmp_path / "ray"), "--cache-dir", str(tmp_path / "cache-ray"),
                 "--engine", "ray", "--ray-workers", "2", *common]) == 0
    assert driver_rows == []
    store = tmp_path / "cache-ray" / "features" / F.STORE
    slots = sorted(store.iterdir())
    assert len(slots) == 2  # the label-free detector reads two positions, one slot each
    for slot in slots:  # every row written by the workers, once
        assert sum(len(np.load(k)) for k in slot.glob("shard-*.keys.npy")) == len(rows) + len(tiny_reference)

    # The sentence encoder's view runs on the driver with either engine: the local run reuses it (a minute of MiniLM
    # on a shared CPU), and computes every hidden state itself.
    (tmp_path / "cache-local" / "features").mkdir(parents=True)
    for view in (tmp_path / "cache-ray" / "features").glob("sentence-*.npy"):
        shutil.copy(view, tmp_path / "cache-local" / "features" / view.name)
    assert main(["-q", "filter", str(data), "-o", str(tmp_path / "local"), "--cache-dir",
                 str(tmp_path / "cache-local"), *common]) == 0
    assert sum(driver_rows) == len(rows) + len(tiny_reference)  # the local engine computed every row itself
    by_ray = {r["id"]: r["harm_score"] for r in read_jsonl(tmp_path / "ray" / "scores.jsonl")}
    local = {r["id"]: r["harm_score"] for r in read_jsonl(tmp_path / "local" / "scores.jsonl")}
    assert by_ray.keys() == local.keys() == {r["id"] for r in rows}
    np.testing.assert_allclose([by_ray[i] for i in local], list(local.values()), atol=1e-4, rtol=0)
    assert len(set(local.values())) > 1  # scores that tell rows apart, not a constant both engines would share

    kept, removed = read_jsonl(tmp_path / "ray" / "kept.jsonl"), read_jsonl(tmp_path / "ray" / "removed.jsonl")
    assert len(kept) == 24 and len(removed) == 6
    assert sorted(r["id"] for r in kept + removed) == sorted(r["id"] for r in rows)
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["config"]["engine"] == "ray" and summary["n_kept"] + summary["n_removed"] == len(rows)

    # Ray Data read the JSONL itself: the driver sent the workers only the guard's reference rows.
    assert sent == [(True, len(tiny_reference))]

    # A rerun finds every row in the store and starts no workers.
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    config = FilterConfig(model=str(tiny_model_dir), engine="ray", ray_workers=2, detector="label-free")
    samples = [Sample(id=r["id"], messages=[{"role": "user", "content": r["prompt"]},
                                              {"role": "assistant", "content": r["response"]}]) for r in rows]
    feats, again = extract_with_ray(samples, model, tokenizer, config=config, positions=["prompt_last"],
                                    cache_dir=tmp_path / "cache-ray" / "features", progress=False)
    assert again["sent"] == again["computed"] == again["workers"] == 0
    assert feats.n_computed == 0 and feats.get(feats.layers[0], "prompt_last").shape[0] == len(rows)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_ray_data_reads_the_input(ray_session, tiny, tiny_model_dir, tmp_path, fmt):
    """JSONL and Parquet inputs are read by Ray Data's read tasks and parsed there by saft's own parser: every row
    the driver parsed (a byte-order mark, CRLF, a U+2028 inside a string, a blank and an invalid line included) is
    found in the store without the driver sending it, and the features equal the local engine's."""
    import pandas as pd

    from saft.data import scan_samples
    from saft.engine_ray import extract_with_ray
    from saft.features import extract_features

    model, tokenizer = tiny
    rows = toy_rows(12)
    rows[3]["response"] += " line\u2028separator"
    data = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        data.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines[:6] + ["", "{not json"] + lines[6:]).encode())
    else:
        pd.DataFrame(rows).to_parquet(data)
    dataset = scan_samples(data, skip_invalid=True)
    assert len(dataset) == len(rows)
    config = FilterConfig(model=str(tiny_model_dir), engine="ray", ray_workers=2)
    feats, stats = extract_with_ray(dataset.samples, model, tokenizer, config=config, positions=["prompt_last"],
                                    cache_dir=tmp_path / "features", source=dataset, progress=False)
    assert stats["sent"] == 0 and stats["computed"] == len(rows) and stats["workers"] == 2
    local = extract_features(model, tokenizer, dataset.samples, layers=[config.layer], positions=["prompt_last"],
                             max_length=config.max_length, progress=False)
    layer = feats.layers[0]
    np.testing.assert_allclose(feats.get(layer, "prompt_last"), local.get(layer, "prompt_last"), atol=1e-4, rtol=0)


def test_rows_ray_read_otherwise_are_sent_from_the_driver(ray_session, tiny, tiny_model_dir, tmp_path):
    """A row Ray Data's pass did not produce as the driver parsed it (here: the file the workers read differs in
    one row) is sent from the driver's parse, so the features are complete and right either way."""
    from saft.data import Sample, scan_samples
    from saft.engine_ray import extract_with_ray

    model, tokenizer = tiny
    rows = toy_rows(8)
    source = scan_samples(write_jsonl(tmp_path / "data.jsonl", rows))
    samples = list(source.samples)
    samples[5] = Sample(id="5", messages=[{"role": "user", "content": "a prompt only the driver has"},
                                          {"role": "assistant", "content": "and its answer"}])
    config = FilterConfig(model=str(tiny_model_dir), engine="ray", ray_workers=1)
    feats, stats = extract_with_ray(samples, model, tokenizer, config=config, positions=["prompt_last"],
                                    cache_dir=tmp_path / "features", source=source, progress=False)
    assert stats["sent"] == 1 and stats["computed"] == len(rows) + 1
    assert feats.n_computed == 0 and feats.get(feats.layers[0], "prompt_last").shape[0] == len(rows)


def test_engine_options_are_checked(monkeypatch):
    import saft.engine_ray as E

    with pytest.raises(ValueError, match="engine must be one of local, ray"):
        FilterConfig(engine="spark")
    with pytest.raises(ValueError, match="apply to --engine ray"):
        FilterConfig(ray_workers=2)
    with pytest.raises(ValueError, match="at least 1"):
        FilterConfig(engine="ray", ray_workers=0)
    monkeypatch.setattr(E, "ray_available", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'saft-llm\[ray\]'"):
        FilterConfig(engine="ray")


def test_one_worker_per_gpu():
    import saft.engine_ray as E

    def cluster(**resources):
        return SimpleNamespace(cluster_resources=lambda: resources)

    plan = E._plan(cluster(GPU=4.0, CPU=32.0), None)
    assert (plan["workers"], plan["num_gpus"], plan["device"]) == (4, 1, "cuda")
    assert E._plan(cluster(GPU=4.0, CPU=32.0), 2)["workers"] == 2
    with pytest.raises(ValueError, match="4 GPUs"):
        E._plan(cluster(GPU=4.0, CPU=32.0), 5)
    plan = E._plan(cluster(CPU=16.0), None)
    assert (plan["workers"], plan["num_gpus"], plan["device"], plan["threads"]) == (4, 0, "cpu", 4)
    assert (plan["num_cpus"], E._plan(cluster(CPU=2.0), 2)["threads"]) == (1, 1)
    # workers on every CPU leave one for Ray Data's read tasks, which would otherwise never be scheduled
    assert E._plan(cluster(CPU=2.0), 2)["num_cpus"] == 0.5 and E._plan(cluster(CPU=1.0), 1)["num_cpus"] == 0.5


def test_a_worker_error_is_reported(ray_session, tiny, tmp_path):
    """A worker that cannot load the model (another node without the folder) stops the run with the worker's own
    error, not Ray's traceback and not a silent recomputation on the driver."""
    from saft.engine_ray import extract_with_ray

    model, tokenizer = tiny
    config = FilterConfig(model=str(tmp_path / "not-on-this-node"), engine="ray", ray_workers=1)
    samples = [Sample(id=r["id"], messages=[{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["response"]}]) for r in toy_rows(4)]
    with pytest.raises(ValueError, match="a Ray worker failed: .*not-on-this-node"):
        extract_with_ray(samples, model, tokenizer, config=config, positions=["prompt_last"],
                         cache_dir=tmp_path / "features", progress=False)
