"""Faults and hostile input at the command line: kill -9 mid-work, damaged cache entries, two runs sharing one
cache, byte-identical reruns, pickles, ids and links that try to escape the output folder, file modes.

Each fault test runs `python -m saft.cli` as a subprocess on the tiny model (tests/conftest.py) with SAFT_CACHE in
a temporary folder, so it tests whatever the feature store and Trainer do, the way a user's run would meet them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import saft
from conftest import toy_rows, write_jsonl

SRC = Path(saft.__file__).resolve().parents[1]
FILTER = ["--detector", "subspace", "--rule", "fraction", "--fraction", "0.2", "--batch-size", "1", "--device", "cpu"]


def saft_env(cache: Path) -> dict:
    env = dict(os.environ, SAFT_CACHE=str(cache), PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def start(args: list[str], cache: Path, log: Path) -> subprocess.Popen:
    f = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "saft.cli", *args], env=saft_env(cache), stdout=f, stderr=f)


def run_saft(args: list[str], cache: Path, log: Path, *, timeout: int = 300) -> None:
    proc = start(args, cache, log)
    rc = proc.wait(timeout=timeout)
    assert rc == 0, log.read_text()[-3000:]


def kill_when(proc: subprocess.Popen, mid_work, *, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as `mid_work()` holds; fail if the process ends first (the work was too short to
    interrupt, and the test would prove nothing)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed mid-work")
        if mid_work():
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            return
        time.sleep(0.005)
    proc.kill()
    pytest.fail("the run never reached the point to kill it at")


def feature_files(cache: Path) -> list[Path]:
    """Files the feature store holds (its own manifests aside): finished work, whatever the store's layout."""
    return [p for p in (cache / "features").rglob("*") if p.is_file() and p.suffix != ".json"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """120 rows with long prompts: at batch size 1 feature extraction takes long enough to be interrupted."""
    rows = toy_rows(120)
    for r in rows:
        r["prompt"] = (r["prompt"] + " ") * 6
    return write_jsonl(tmp_path_factory.mktemp("pool") / "pool.jsonl", rows)


@pytest.fixture(scope="module")
def reference_run(pool, tiny_model_dir, tmp_path_factory) -> tuple[bytes, Path]:
    """scores.jsonl of one uninterrupted run with a fresh cache, and that cache."""
    tmp = tmp_path_factory.mktemp("reference")
    run_saft(["filter", str(pool), "-o", str(tmp / "out"), "--model", str(tiny_model_dir), *FILTER], tmp / "cache",
             tmp / "log")
    return (tmp / "out" / "scores.jsonl").read_bytes(), tmp / "cache"


@pytest.fixture
def reference(reference_run) -> bytes:
    return reference_run[0]


def test_same_input_same_seed_gives_byte_identical_scores_from_two_processes(pool, tiny_model_dir, reference, tmp_path):
    run_saft(["filter", str(pool), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir), *FILTER],
             tmp_path / "cache", tmp_path / "log")
    assert (tmp_path / "out" / "scores.jsonl").read_bytes() == reference


def test_kill_9_during_feature_extraction_then_rerun_gives_the_same_scores(pool, tiny_model_dir, reference, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ["filter", str(pool), "-o", str(out), "--model", str(tiny_model_dir), *FILTER]
    kill_when(start(args, cache, tmp_path / "log"), lambda: bool(feature_files(cache)))
    assert not (out / "scores.jsonl").exists()  # killed before any output: nothing half-written there either
    run_saft(args, cache, tmp_path / "log")
    assert (out / "scores.jsonl").read_bytes() == reference


def test_a_damaged_cache_entry_is_detected_and_redone(pool, tiny_model_dir, reference_run, tmp_path):
    """Every cached feature file cut to half its length (a torn write: power loss, a full disk, a copy cut
    short): the rerun must not trust it, and gives the uninterrupted run's scores."""
    reference, finished = reference_run
    cache, out = tmp_path / "cache", tmp_path / "out"
    shutil.copytree(finished, cache)
    damaged = feature_files(cache)
    assert damaged
    for p in damaged:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    run_saft(["filter", str(pool), "-o", str(out), "--model", str(tiny_model_dir), *FILTER], cache, tmp_path / "log")
    assert (out / "scores.jsonl").read_bytes() == reference


def test_two_runs_sharing_one_cache_at_the_same_moment(pool, tiny_model_dir, reference, tmp_path):
    cache = tmp_path / "cache"
    procs = [start(["filter", str(pool), "-o", str(tmp_path / f"out{i}"), "--model", str(tiny_model_dir), *FILTER],
                   cache, tmp_path / f"log{i}") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"log{i}").read_text()[-3000:]
    for i in range(2):
        assert (tmp_path / f"out{i}" / "scores.jsonl").read_bytes() == reference
    # the cache they left is sound: a third run reads it and gives the same scores
    run_saft(["filter", str(pool), "-o", str(tmp_path / "out2"), "--model", str(tiny_model_dir), *FILTER], cache,
             tmp_path / "log2")
    assert (tmp_path / "out2" / "scores.jsonl").read_bytes() == reference


# ---- fine-tuning ------------------------------------------------------------------------------------------------

FINETUNE = ["--max-steps", "16", "--save-steps", "4", "--batch-size", "2", "--max-length", "96", "--rank", "4",
            "--logging-steps", "1", "--device", "cpu"]


def _adapter(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def _losses(folder: Path) -> list:
    return [(r["step"], r["loss"]) for r in json.loads((folder / "log_history.json").read_text()) if "loss" in r]


def test_kill_9_during_fine_tuning_resumes_from_the_last_complete_checkpoint(pool, tiny_model_dir, tmp_path):
    import numpy as np

    ref, ft = tmp_path / "ref", tmp_path / "ft"
    base = ["finetune", str(pool), "--model", str(tiny_model_dir), *FINETUNE]
    run_saft([*base, "-o", str(ref)], tmp_path / "cache", tmp_path / "log")
    checkpoints = ft / "checkpoints"

    def mid_training():  # a complete checkpoint exists, and training goes on after it
        return any((c / "trainer_state.json").exists() for c in checkpoints.glob("checkpoint-*"))

    kill_when(start([*base, "-o", str(ft)], tmp_path / "cache", tmp_path / "log"), mid_training)
    assert not (ft / "adapter").exists()
    # A checkpoint torn by a crash mid-save (everything but trainer_state.json, which Trainer writes last) must not
    # be resumed from.
    last = max((c for c in checkpoints.glob("checkpoint-*") if (c / "trainer_state.json").exists()),
               key=lambda c: int(c.name.split("-")[1]))
    torn = checkpoints / "checkpoint-14"
    shutil.copytree(last, torn)
    (torn / "trainer_state.json").unlink()
    run_saft([*base, "-o", str(ft)], tmp_path / "cache", tmp_path / "log")
    a, b = _adapter(ref), _adapter(ft)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    resumed = _losses(ft)
    assert resumed[-1][0] == 16 and resumed == _losses(ref)[-len(resumed):]
    assert int(re.search(r"resuming from .*checkpoint-(\d+)", (tmp_path / "log").read_text()).group(1)) == int(
        last.name.split("-")[1])


# ---- the experiment ---------------------------------------------------------------------------------------------

def test_kill_9_during_the_experiment_resumes_at_the_unfinished_arm(tiny_model_dir, tmp_path):
    from test_experiment import tiny_raw

    raw = tiny_raw(tmp_path / "raw")
    args = ["experiment", "--model", str(tiny_model_dir), "--pool-size", "30", "--runs", "0.3/0",
            "--n-harmful", "2", "--n-helpful", "3", "--n-labels", "12", "--max-new-tokens", "3", "--max-steps", "2", "--batch-size", "8",
            "--gen-batch-size", "4", "--raw-dir", str(raw), "--device", "cpu", "--arms", "base", "sft", "saft"]
    run_saft([*args, "-o", str(tmp_path / "ref")], tmp_path / "cache", tmp_path / "log")
    exp = tmp_path / "exp"
    seed_dir = exp / "rate0.3" / "seed0"
    kill_when(start([*args, "-o", str(exp)], tmp_path / "cache", tmp_path / "log"),
              lambda: (exp / "base" / "metrics.json").exists())
    assert not (exp / "results.json").exists()
    finished = {p.parent.name for p in seed_dir.glob("*/metrics.json")}
    assert finished != {"sft", "saft"}
    run_saft([*args, "-o", str(exp)], tmp_path / "cache", tmp_path / "log")
    assert untimed(exp) == untimed(tmp_path / "ref")


def untimed(folder: Path) -> list[dict]:
    """results.json's rows without what depends on the clock (seconds, the load average)."""
    rows = json.loads((folder / "results.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k not in ("train_seconds", "eval_seconds", "load_average")} for r in rows]


# ---- nothing lost with --skip-invalid ---------------------------------------------------------------------------

def test_skip_invalid_loses_no_row(tiny_model_dir, tmp_path):
    from saft.cli import main

    good = [json.dumps(r) for r in toy_rows(12)]
    bad = ['{"prompt": 5, "response": "x"}', "{not json", '{"prompt": "p"}', "[1, 2]", '{"prompt": "", "response": "r"}']
    lines = good[:4] + bad[:2] + good[4:9] + bad[2:] + good[9:]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["-q", "filter", str(data), "-o", str(out), "--skip-invalid", "--model", str(tiny_model_dir),
                 *FILTER]) == 0
    kept, removed = (out / "kept.jsonl").read_text().splitlines(), (out / "removed.jsonl").read_text().splitlines()
    invalid = [json.loads(line) for line in (out / "invalid.jsonl").read_text().splitlines()]
    assert sorted(kept + removed + [r["raw"] for r in invalid]) == sorted(lines)  # every row, verbatim
    assert [r["raw"] for r in invalid] == bad and [r["line"] for r in invalid] == [5, 6, 12, 13, 14]
    assert invalid[0]["reason"] == "field 'prompt' must be text, got int"
    s = json.loads((out / "summary.json").read_text())
    assert (s["n_kept"], s["n_removed"], s["n_invalid"], s["n_input_rows"]) == (len(kept), len(removed), 5, 17)
    assert s["outputs"]["invalid"] == str(out / "invalid.jsonl")


# ---- untrusted input --------------------------------------------------------------------------------------------

def test_a_model_folder_holding_a_pickle_is_refused(tiny_model_dir, tmp_path, capsys):
    import torch

    from saft.cli import main
    from saft.models import ModelError, load_model

    for name in ("pytorch_model.bin", "weights.dat"):  # by name, and by a pickle's first bytes under any name
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        torch.save({"x": torch.zeros(1)}, folder / name, _use_new_zipfile_serialization=name.endswith(".bin"))
        with pytest.raises(ModelError, match=f"holds {re.escape(name)}, a pickle"):
            load_model(str(folder), device="cpu")
    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(6))
    assert main(["-q", "filter", str(data), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "weights.dat"),
                 *FILTER]) == 2
    err = capsys.readouterr().err
    assert "a pickle (loading one can run code)" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "scores.jsonl").exists()


def test_model_code_runs_only_when_asked(tiny_model_dir, tmp_path):
    from saft.models import ModelError, check_model_folder

    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("raise SystemExit('model code ran')\n")
    with pytest.raises(ModelError, match="trust_remote_code"):
        check_model_folder(folder)
    check_model_folder(folder, trust_remote_code=True)  # asked for: allowed through


def test_a_dataset_folder_holding_a_pickle_is_refused(tmp_path):
    import pickle

    import datasets

    from saft.data import DataError, load_samples

    datasets.Dataset.from_list(toy_rows(4)).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "ds" / "extra.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DataError, match=r"holds extra\.bin, a pickle"):
        load_samples(tmp_path / "ds")


def test_the_source_never_unpickles():
    """No pickle, joblib or dill; np.load never with allow_pickle=True (its default is False); torch.load only
    with weights_only=True; trust_remote_code never switched on in code."""
    offenders = []
    for path in sorted((SRC / "saft").rglob("*.py")):
        text = path.read_text()
        for pattern in (r"^\s*(import|from)\s+(pickle|cPickle|joblib|dill|cloudpickle)\b", r"allow_pickle\s*=\s*True",
                        r"torch\.load\((?![^)]*weights_only\s*=\s*True)", r"trust_remote_code\s*=\s*True",
                        r"\.from_pretrained\([^)]*use_safetensors\s*=\s*False"):
            offenders += [f"{path.name}: {m.group(0).strip()}" for m in re.finditer(pattern, text, re.M)]
    assert not offenders


def test_ids_never_become_file_names_and_outputs_stay_in_the_output_folder(tiny_model_dir, tmp_path, monkeypatch):
    from saft.cli import main

    hostile = ["../../escaped", "/tmp/saft-escaped-abs", "a/../../b", "..", ".", "~", "$HOME", "x\x00y", "CON",
               "report.html", "kept.jsonl", "\u202egnp.exe", "%2e%2e%2fz"]
    rows = [{**r, "id": hostile[i % len(hostile)] + (f"-{i}" if i >= len(hostile) else "")}
            for i, r in enumerate(toy_rows(26))]
    work = tmp_path / "a" / "b" / "work"  # relative names like ../../x would land inside tmp_path: seen below
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    data = write_jsonl(work / "d.jsonl", rows)
    before = set(tmp_path.rglob("*"))
    out = work / "out"
    assert main(["-q", "filter", str(data), "-o", str(out), "--report", "--model", str(tiny_model_dir),
                 "--cache-dir", str(tmp_path / "cache"), *FILTER]) == 0
    created = set(tmp_path.rglob("*")) - before
    outside = [p for p in created if not (p.is_relative_to(out) or p.is_relative_to(tmp_path / "cache"))]
    assert not outside
    assert {p.name for p in out.iterdir()} == {"scores.jsonl", "kept.jsonl", "removed.jsonl", "invalid.jsonl",
                                                "summary.json", "report.html"}
    assert not Path("/tmp/saft-escaped-abs").exists()
    assert [json.loads(line)["id"] for line in (out / "scores.jsonl").read_text().splitlines()] == [r["id"] for r in rows]


def test_a_link_in_the_output_folder_is_replaced_not_followed(tiny_model_dir, tmp_path):
    from saft.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(10))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    names = ("kept.jsonl", "removed.jsonl", "scores.jsonl", "summary.json", "invalid.jsonl", "report.html")
    for name in names:
        (out / name).symlink_to(victim)
    assert main(["-q", "filter", str(data), "-o", str(out), "--report", "--model", str(tiny_model_dir), "--cache-dir",
                 str(tmp_path / "cache"), *FILTER]) == 0
    assert victim.read_text() == "precious"
    assert not any((out / n).is_symlink() for n in names) and all((out / n).stat().st_size > 0 for n in names[:4])


# ---- file modes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_get_the_users_normal_file_mode(tmp_path, umask):
    import stat

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saft.data import load_samples, write_json, write_jsonl as saft_write_jsonl, write_subset

    rows = toy_rows(4)
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "d.jsonl", rows)
    (src / "d.csv").write_text("prompt,response\na,b\n")
    pq.write_table(pa.Table.from_pylist(rows), src / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(src / "d_ds"))
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        written = [saft_write_jsonl([{"a": 1}], out / "x.jsonl"), write_json({"a": 1}, out / "x.json")]
        for name in ("d.jsonl", "d.csv", "d.parquet"):
            written.append(write_subset(load_samples(src / name), [0], out / f"kept-{name}"))
        folder = write_subset(load_samples(src / "d_ds"), [0], out / "kept_ds")
        for p in written:
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in folder.iterdir())
        # an existing output keeps the mode its owner gave it
        os.chmod(out / "x.jsonl", 0o640)
        saft_write_jsonl([{"a": 2}], out / "x.jsonl")
        assert stat.S_IMODE((out / "x.jsonl").stat().st_mode) == 0o640
    finally:
        os.umask(old)
