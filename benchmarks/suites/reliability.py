"""reliability: the faults and hostile inputs tried at the command line, and what each lost.

Every scenario runs `python -m saft.cli` in a subprocess on a tiny random Llama (the test suite's, built from a
config; seeded) with SAFT_CACHE in a temporary folder:
- determinism: two fresh processes, same input and seed: scores.jsonl compared byte for byte;
- kill -9 during feature extraction (once the feature store holds finished work), then the same command again;
- a damaged cache entry: every cached feature file cut to half its length, then the same command again;
- two runs sharing one cache at the same moment, then a third run reading what they left;
- kill -9 during fine-tuning (once a checkpoint is complete), plus a torn checkpoint (everything but
  trainer_state.json) planted after it, then the same command again: the adapter against an uninterrupted run's;
- kill -9 during `saft experiment` (once the second arm has finished), then again: results.json's rows (seconds and load aside) against an
  uninterrupted run's;
- hostile JSONL and CSV files with --skip-invalid: invalid JSON, bytes that are not UTF-8, deep nesting, lone
  surrogates, NUL, right-to-left marks, emoji, CRLF, a byte-order mark, a 1 MB field, wrong types, repeated ids:
  every input row must end in kept, removed or invalid, as its own text;
- random bytes under every data suffix: the command must answer with an error message, never a traceback;
- pickles: a model folder and a dataset folder holding one, a model folder asking to run its own code;
- escapes: ids that look like paths, and links planted in the output folder pointing at a file outside it.
"Lost" counts input rows found in none of kept, removed and invalid, or found changed.

    python benchmarks/run.py reliability [--rows 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "reliability"
QUESTION = ("Under kill -9, damaged cache entries, two runs sharing a cache and hostile input files, does saft lose "
            "or change any row, or give different scores than an uninterrupted run?")
ROOT = Path(__file__).resolve().parents[2]
FILTER = ["--detector", "subspace", "--rule", "fraction", "--fraction", "0.2", "--batch-size", "2", "--device", "cpu"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=300, help="rows of the pool the fault scenarios filter")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model and of the random inputs")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")


# ---------------------------------------------------------------------------------------------------- helpers

class Runner:
    def __init__(self, work: Path):
        self.work = work
        self.n = 0

    def start(self, args: list[str], cache: Path) -> tuple[subprocess.Popen, Path]:
        self.n += 1
        log = self.work / f"log-{self.n:03d}.txt"
        env = dict(os.environ, SAFT_CACHE=str(cache), PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        f = open(log, "wb")
        return subprocess.Popen([sys.executable, "-m", "saft.cli", *args], env=env, stdout=f, stderr=f), log

    def run(self, args: list[str], cache: Path, timeout: int = 600) -> tuple[int, str]:
        proc, log = self.start(args, cache)
        rc = proc.wait(timeout=timeout)
        return rc, log.read_text(errors="replace")


def kill_when(proc: subprocess.Popen, mid_work, timeout: float = 300) -> bool:
    """SIGKILL once `mid_work()` holds; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if mid_work():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return False


def feature_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "features").rglob("*") if p.is_file() and p.suffix != ".json"]


def lines_of(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").split("\n")[:-1] if path.exists() else []


def accounted(out: Path, input_rows: list[str]) -> dict:
    """Rows in, rows found unchanged in kept.jsonl + removed.jsonl + invalid.jsonl, and rows lost (None when the
    run wrote no outputs at all: it stopped, and the input is untouched)."""
    if not (out / "summary.json").exists():
        return {"rows_in": len(input_rows), "rows_out": 0, "lost": None}
    found = lines_of(out / "kept.jsonl") + lines_of(out / "removed.jsonl")
    found += [json.loads(line)["raw"] for line in lines_of(out / "invalid.jsonl")]
    remaining = list(input_rows)
    for row in found:
        if row in remaining:
            remaining.remove(row)
    return {"rows_in": len(input_rows), "rows_out": len(found), "lost": len(remaining)}


def traceback_in(text: str) -> bool:
    return "Traceback (most recent call last)" in text


def build_tiny_model(folder: Path, seed: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    make_model(len(tok), seed=seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def pool_rows(n: int, seed: int) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import toy_rows

    rows = toy_rows(n)
    rng = random.Random(seed)
    rng.shuffle(rows)
    for r in rows:
        r["prompt"] = (r["prompt"] + " ") * 12  # long enough that extraction can be interrupted
    return rows


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    return path


# ---------------------------------------------------------------------------------------------------- scenarios

def hostile_jsonl_lines(seed: int) -> list[str]:
    good = lambda i, p, r: json.dumps({"id": f"h{i}", "prompt": p, "response": r, "is_safe": i % 3 != 0},  # noqa: E731
                                      ensure_ascii=False)
    lines = [good(0, "\u202eright-to-left override\u202c \u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627"),
             good(1, "emoji \U0001f469\u200d\U0001f469\u200d\U0001f467 and NUL \x00 inside", "ok \x00"),
             json.dumps({"id": "h2", "prompt": "lone \ud800 surrogate", "response": "x\udfff"}),  # escapes: valid JSON
             good(3, "a 1 MB field", "y" * 1_000_000),
             good(4, "line\r\nbreaks\rin\ntext", "\u2028\u2029"),
             "{not json at all",
             '{"prompt": "caf\udce9", "response": "bytes that are not UTF-8"}',  # \udce9: the byte 0xE9, raw
             '{"prompt": "p", "response": "r", "x": ' + "[" * 50_000 + "]" * 50_000 + "}",
             json.dumps({"prompt": 5, "response": "a number as a prompt"}),
             json.dumps({"id": "h0", "prompt": "a repeated id", "response": "r"}),
             json.dumps(["a", "list"]), "42", "null",
             json.dumps({"messages": [{"role": "user", "content": "u"}]}),
             json.dumps({"prompt": "", "response": "empty prompt"})]
    rng = random.Random(seed)
    lines += [good(10 + i, f"ordinary prompt {i} " + rng.choice(["hi", "how do I hurt someone"]), f"answer {i}")
              for i in range(20)]
    rng.shuffle(lines)
    return lines


def scenario_hostile_jsonl(runner: Runner, model: Path, work: Path, seed: int) -> dict:
    lines = hostile_jsonl_lines(seed)
    # CRLF line endings and a byte-order mark on top
    data = work / "hostile.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n")
    out = work / "hostile-out"
    rc, log = runner.run(["filter", str(data), "-o", str(out), "--skip-invalid", "--model", str(model), *FILTER],
                         work / "cache-hostile")
    got = accounted(out, lines)  # a row's text is the line without its CRLF (and the first without the BOM)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return {"scenario": "hostile JSONL, --skip-invalid", "tried": f"{len(lines)} rows (RTL, emoji, NUL, lone "
            "surrogates, non-UTF-8 bytes, 50k-deep nesting, 1 MB field, CRLF, BOM, wrong types, repeated id)",
            "outcome": f"exit {rc}; {summary.get('n_kept')} kept, {summary.get('n_removed')} removed, "
            f"{summary.get('n_invalid')} invalid" + ("; traceback" if traceback_in(log) else ""),
            **got, "same_as_uninterrupted": None, "ok": rc == 0 and got["lost"] == 0 and not traceback_in(log)}


def scenario_hostile_csv(runner: Runner, model: Path, work: Path, seed: int) -> dict:
    rng = random.Random(seed)
    records = [["prompt", "response", "note"]]
    for i in range(20):
        records.append([f"prompt {i} " + rng.choice(["plain", "\u202eRTL", "tab\there", "quote \" inside",
                                                     "multi\nline", "comma, inside", "\U0001f600"]),
                        f"answer {i}", rng.choice(["", "x" * 300_000, "NUL \x00", "\r\n"])])
    records += [["only one cell"], ["a", "b", "c", "one too many"], ["", "empty prompt", "n"]]
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\r\n").writerows(records)
    data = work / "hostile.csv"
    data.write_text(buf.getvalue(), encoding="utf-8", newline="")
    out = work / "hostile-csv-out"
    rc, log = runner.run(["filter", str(data), "-o", str(out), "--skip-invalid", "--model", str(model), *FILTER],
                         work / "cache-hostile")
    back = []
    csv.field_size_limit(2**31 - 1)  # the 300 kB cells: over the csv module's default limit
    for name in ("kept.csv", "removed.csv"):
        if (out / name).exists():
            with open(out / name, encoding="utf-8", newline="") as f:
                back += list(csv.reader(f))[1:]
    back += [next(csv.reader(io.StringIO(json.loads(line)["raw"], newline=""))) for line in lines_of(out / "invalid.jsonl")]
    remaining = list(records[1:])
    for r in back:
        if r in remaining:
            remaining.remove(r)
    return {"scenario": "hostile CSV, --skip-invalid", "tried": f"{len(records) - 1} records (quoted newlines, "
            "quotes, RTL, emoji, NUL, 300 kB cells, CRLF, too few and too many cells)",
            "outcome": f"exit {rc}" + ("; traceback" if traceback_in(log) else ""),
            "rows_in": len(records) - 1, "rows_out": len(back), "lost": len(remaining), "same_as_uninterrupted": None,
            "ok": rc == 0 and not remaining and not traceback_in(log)}


def scenario_random_bytes(runner: Runner, model: Path, work: Path, seed: int) -> dict:
    """Random bytes under every suffix, checked in one process (starting one per file would take minutes)."""
    rng = random.Random(seed)
    folder = work / "random-bytes"
    folder.mkdir()
    n = 0
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        for i in range(25):
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
            if i % 5 == 0:
                data = b'{"prompt": "x", "response": "y"}\n' + data  # a usable row, then garbage
            (folder / f"f{i}{suffix}").write_bytes(data)
            n += 1
    code = ("import sys, pathlib\nfrom saft.cli import main\nbad = 0\n"
            "for p in sorted(pathlib.Path(sys.argv[1]).iterdir()):\n"
            "    for skip in ([], ['--skip-invalid']):\n"
            "        try:\n"
            "            main(['-q', 'score', str(p), '-o', str(p) + '.out', '--model', sys.argv[2], '--detector',"
            " 'subspace', '--device', 'cpu', *skip])\n"
            "        except BaseException as e:\n"
            "            bad += 1; print('UNCAUGHT', p.name, type(e).__name__, e)\n"
            "print('uncaught', bad)\n")
    env = dict(os.environ, SAFT_CACHE=str(work / "cache-bytes"), PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(model)], env=env, capture_output=True,
                          text=True, timeout=900)
    uncaught = int(proc.stdout.strip().rsplit(" ", 1)[-1]) if "uncaught" in proc.stdout else None
    return {"scenario": "random bytes as input", "tried": f"{n} files of random bytes (.jsonl, .json, .csv, "
            ".parquet), with and without --skip-invalid",
            "outcome": f"uncaught exceptions: {uncaught}" + ("" if proc.returncode == 0 else f"; exit {proc.returncode}"),
            "rows_in": None, "rows_out": None, "lost": None, "same_as_uninterrupted": None, "ok": uncaught == 0}


def refusal(runner: Runner, model_arg: str, data: Path, work: Path, name: str, tried: str, expect: str) -> dict:
    out = work / f"out-{name.replace(' ', '-')}"
    rc, log = runner.run(["filter", str(data), "-o", str(out), "--model", model_arg, *FILTER], work / "cache-refuse")
    ok = rc == 2 and expect in log and not traceback_in(log) and not (out / "scores.jsonl").exists()
    msg = next((line for line in log.splitlines() if line.startswith("saft: error")), log.strip()[-200:])
    return {"scenario": name, "tried": tried, "outcome": f"exit {rc}: {msg[:160]}", "rows_in": None, "rows_out": None,
            "lost": None, "same_as_uninterrupted": None, "ok": ok}


def scenario_pickles(runner: Runner, model: Path, work: Path, data: Path) -> list[dict]:
    import pickle

    import datasets

    rows = []
    bad = work / "model-with-pickle"
    shutil.copytree(model, bad)
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": [0.0]}))
    rows.append(refusal(runner, str(bad), data, work, "pickle in the model folder",
                        "pytorch_model.bin (a pickle) beside the safetensors", "a pickle"))
    bad2 = work / "model-with-disguised-pickle"
    shutil.copytree(model, bad2)
    (bad2 / "extra.dat").write_bytes(pickle.dumps([1, 2, 3]))
    rows.append(refusal(runner, str(bad2), data, work, "disguised pickle in the model folder",
                        "a pickle named extra.dat", "a pickle"))
    remote = work / "model-with-code"
    shutil.copytree(model, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text("import sys; sys.exit('model code ran')\n")
    rows.append(refusal(runner, str(remote), data, work, "model code in the model folder",
                        "config.json auto_map naming evil.py, no --trust-remote-code", "trust_remote_code"))
    ds = work / "dataset-with-pickle"
    datasets.Dataset.from_list([json.loads(line) for line in lines_of(data)[:10]]).save_to_disk(str(ds))
    (ds / "cache.pkl").write_bytes(pickle.dumps({"a": 1}))
    rows.append(refusal(runner, str(model), ds, work, "pickle in the dataset folder",
                        "a datasets folder holding cache.pkl", "a pickle"))
    return rows


def scenario_escapes(runner: Runner, model: Path, work: Path) -> dict:
    base = work / "escape" / "a" / "b"
    base.mkdir(parents=True)
    ids = ["../../escaped", "/tmp/saft-reliability-escaped", "a/../../b", "..", "~", "$HOME", "x\x00y", "kept.jsonl",
           "summary.json", "\u202egnp.exe"]
    rows = [{"id": ids[i] if i < len(ids) else f"r{i}", "prompt": f"prompt {i}", "response": f"response {i}"}
            for i in range(20)]
    data = write_lines(base / "d.jsonl", [json.dumps(r) for r in rows])
    victim = work / "escape" / "victim.txt"
    victim.write_text("precious")
    out = base / "out"
    out.mkdir()
    for name in ("kept.jsonl", "scores.jsonl", "summary.json", "invalid.jsonl", "report.html"):
        (out / name).symlink_to(victim)
    before = set((work / "escape").rglob("*"))
    proc, log = runner.start(["filter", str(data), "-o", str(out), "--report", "--model", str(model), *FILTER],
                             work / "cache-escape")
    rc = proc.wait(timeout=600)
    created = set((work / "escape").rglob("*")) - before
    outside = [p for p in created if not p.is_relative_to(out)] + (
        [Path("/tmp/saft-reliability-escaped")] if Path("/tmp/saft-reliability-escaped").exists() else [])
    intact = victim.read_text() == "precious"
    return {"scenario": "ids as paths, links in -o", "tried": f"{len(ids)} ids like ../../escaped, /tmp/..., NUL; "
            "kept.jsonl and 4 more outputs pre-planted as links to a file outside -o",
            "outcome": f"exit {rc}; files outside -o: {len(outside)}; linked file {'unchanged' if intact else 'CHANGED'}",
            **accounted(out, lines_of(data)), "same_as_uninterrupted": None,
            "ok": rc == 0 and not outside and intact}


def fault_scenarios(runner: Runner, model: Path, work: Path, data: Path) -> list[dict]:
    rows_in = lines_of(data)
    args = lambda out: ["filter", str(data), "-o", str(out), "--model", str(model), *FILTER]  # noqa: E731
    rc, log = runner.run(args(work / "ref"), work / "cache-ref")
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{log[-2000:]}")
    ref = (work / "ref" / "scores.jsonl").read_bytes()
    same = lambda out: (out / "scores.jsonl").exists() and (out / "scores.jsonl").read_bytes() == ref  # noqa: E731
    res = []

    rc, log = runner.run(args(work / "det"), work / "cache-det")
    res.append({"scenario": "determinism", "tried": "a second process, fresh cache, same input and seed",
                "outcome": f"exit {rc}; scores.jsonl byte-identical: {same(work / 'det')}", **accounted(work / "det", rows_in),
                "same_as_uninterrupted": same(work / "det"), "ok": rc == 0 and same(work / "det")})

    cache = work / "cache-kill"
    proc, _ = runner.start(args(work / "kill"), cache)
    t0 = time.time()
    killed = kill_when(proc, lambda: bool(feature_files(cache)))
    at = time.time() - t0
    n_files = len(feature_files(cache))
    rc, log = runner.run(args(work / "kill"), cache)
    res.append({"scenario": "kill -9 during feature extraction", "tried": f"SIGKILL {at:.1f} s in, the feature store "
                f"holding {n_files} file(s) of finished work; then the same command" if killed else "the run ended first",
                "outcome": f"rerun exit {rc}" + ("; traceback" if traceback_in(log) else ""),
                **accounted(work / "kill", rows_in), "same_as_uninterrupted": same(work / "kill"),
                "ok": killed and rc == 0 and same(work / "kill")})

    cache = work / "cache-damage"
    runner.run(args(work / "damage"), cache)
    damaged = feature_files(cache)
    for p in damaged:
        b = p.read_bytes()
        p.write_bytes(b[: len(b) // 2])
    shutil.rmtree(work / "damage")
    rc, log = runner.run(args(work / "damage"), cache)
    err = next((line for line in log.splitlines() if line.startswith("saft: error")), "")
    res.append({"scenario": "damaged cache entry", "tried": f"{len(damaged)} cached feature file(s) cut to half their "
                "length after a finished run; then the same command",
                "outcome": f"rerun exit {rc}" + (f": {err[:160]}" if err else ""), **accounted(work / "damage", rows_in),
                "same_as_uninterrupted": same(work / "damage"), "ok": rc == 0 and same(work / "damage")})

    cache = work / "cache-shared"
    procs = [runner.start(args(work / f"shared{i}"), cache) for i in range(2)]
    rcs = [p.wait(timeout=600) for p, _ in procs]
    rc3, _ = runner.run(args(work / "shared2"), cache)
    both = all(same(work / f"shared{i}") for i in range(3))
    res.append({"scenario": "two runs sharing one cache", "tried": "two processes started together on one empty "
                "cache, then a third reading what they left",
                "outcome": f"exits {rcs + [rc3]}", **accounted(work / "shared0", rows_in),
                "same_as_uninterrupted": both, "ok": rcs == [0, 0] and rc3 == 0 and both})
    return res


def scenario_finetune(runner: Runner, model: Path, work: Path, data: Path) -> dict:
    import numpy as np
    from safetensors.numpy import load_file

    base = ["finetune", str(data), "--model", str(model), "--max-steps", "30", "--save-steps", "4", "--batch-size", "2",
            "--max-length", "96", "--rank", "4", "--logging-steps", "1", "--device", "cpu"]
    cache = work / "cache-ft"
    runner.run([*base, "-o", str(work / "ft-ref")], cache)
    ft = work / "ft"
    ckpts = ft / "checkpoints"
    proc, _ = runner.start([*base, "-o", str(ft)], cache)
    killed = kill_when(proc, lambda: any((c / "trainer_state.json").exists() for c in ckpts.glob("checkpoint-*")))
    complete = sorted((c for c in ckpts.glob("checkpoint-*") if (c / "trainer_state.json").exists()),
                      key=lambda c: int(c.name.split("-")[1]))
    if complete:
        torn = ckpts / "checkpoint-28"
        shutil.copytree(complete[-1], torn)
        (torn / "trainer_state.json").unlink()
    rc, log = runner.run([*base, "-o", str(ft)], cache)
    diff = None
    if rc == 0:
        a, b = load_file(work / "ft-ref" / "adapter" / "adapter_model.safetensors"), load_file(ft / "adapter" / "adapter_model.safetensors")
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a) if a.keys() == b.keys() else float("inf")
    return {"scenario": "kill -9 during fine-tuning", "tried": (f"SIGKILL after {complete[-1].name if complete else '?'}"
            " was complete, a torn checkpoint-28 (no trainer_state.json) planted; then the same command")
            if killed else "the run ended first",
            "outcome": f"rerun exit {rc}; adapter max |difference| against the uninterrupted run: {diff}",
            "rows_in": None, "rows_out": None, "lost": None, "same_as_uninterrupted": diff is not None and diff <= 1e-6,
            "ok": killed and rc == 0 and diff is not None and diff <= 1e-6}


def scenario_experiment(runner: Runner, model: Path, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_experiment import tiny_raw

    raw = tiny_raw(work / "raw")
    args = ["experiment", "--model", str(model), "--pool-size", "30", "--runs", "0.3/0", "--n-harmful", "2", "--n-helpful", "3",
            "--n-labels", "12", "--max-new-tokens", "3", "--max-steps", "2", "--batch-size", "8", "--gen-batch-size", "4",
            "--raw-dir", str(raw), "--device", "cpu", "--arms", "base", "sft", "saft", "random", "oracle"]
    cache = work / "cache-exp"
    runner.run([*args, "-o", str(work / "exp-ref")], cache)
    exp = work / "exp"
    seed_dir = exp / "rate0.3" / "seed0"
    proc, _ = runner.start([*args, "-o", str(exp)], cache)
    killed = kill_when(proc, lambda: (seed_dir / "sft" / "metrics.json").exists())
    finished = sorted(p.parent.name for p in seed_dir.glob("*/metrics.json"))
    rc, log = runner.run([*args, "-o", str(exp)], cache)
    clock = ("train_seconds", "eval_seconds", "load_average")  # what depends on the clock, not on the work
    rows = lambda d: [{k: v for k, v in r.items() if k not in clock} for r in json.loads(  # noqa: E731
        (d / "results.json").read_text())["rows"]] if (d / "results.json").exists() else None
    equal = rows(exp) is not None and rows(exp) == rows(work / "exp-ref")
    return {"scenario": "kill -9 during the experiment", "tried": f"SIGKILL with arms {finished} finished (of 5); "
            "then the same command" if killed else "the run ended first",
            "outcome": f"rerun exit {rc}; results.json rows equal to the uninterrupted run's: {equal}",
            "rows_in": None, "rows_out": None, "lost": None, "same_as_uninterrupted": equal,
            "ok": killed and rc == 0 and equal}


# ---------------------------------------------------------------------------------------------------- suite

def run(args) -> dict:
    import numpy
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "src"))
    import saft

    t0 = time.time()
    owned = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="saft-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        runner = Runner(work)
        model = build_tiny_model(work / "tiny-model", args.seed)
        data = write_lines(work / "pool.jsonl", [json.dumps(r) for r in pool_rows(args.rows, args.seed)])
        table = []

        def attempt(fn, *a):
            t = time.time()
            try:
                out = fn(*a)
            except Exception as e:  # a scenario that breaks is a result too
                out = {"scenario": fn.__name__.removeprefix("scenario_"), "tried": "", "outcome": f"{type(e).__name__}: {e}"[:300],
                       "rows_in": None, "rows_out": None, "lost": None, "same_as_uninterrupted": None, "ok": False}
            for row in out if isinstance(out, list) else [out]:
                row["seconds"] = round(time.time() - t, 1)
                table.append(row)

        attempt(fault_scenarios, runner, model, work, data)
        attempt(scenario_finetune, runner, model, work, data)
        attempt(scenario_experiment, runner, model, work)
        attempt(scenario_hostile_jsonl, runner, model, work, args.seed)
        attempt(scenario_hostile_csv, runner, model, work, args.seed)
        attempt(scenario_random_bytes, runner, model, work, args.seed)
        attempt(scenario_pickles, runner, model, work, data)
        attempt(scenario_escapes, runner, model, work)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    return {"command": " ".join(["python", "benchmarks/run.py", NAME, "--rows", str(args.rows), "--seed", str(args.seed)]),
            "seed": args.seed,
            "data": f"{args.rows} toy rows (tests/conftest.py toy_rows, prompts repeated 12 times), hostile JSONL/CSV "
                    "files and random bytes built in the run; a tiny random Llama (hidden 32, 4 layers) from a config",
            "versions": {"saft": saft.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": numpy.__version__},
            "scenarios": table, "n_ok": sum(r["ok"] for r in table), "n": len(table),
            "rows_lost": sum(r["lost"] or 0 for r in table), "seconds": round(time.time() - t0, 1),
            "cpu_note": "CPU shared with other jobs"}


def render(result: dict, plots_dir: Path) -> str:
    lines = [f"## {NAME}", "", f"**Question.** {QUESTION}", "", f"Command: `{result['command']}` (seed {result['seed']}; "
             f"{result['data']}; {result['seconds']:.0f} s, {result.get('cpu_note', '')}).", "",
             "| scenario | what was tried | outcome | rows in | rows accounted for | rows lost | same as uninterrupted | passed |",
             "|---|---|---|---|---|---|---|---|"]
    cell = lambda v: "—" if v is None else ("yes" if v is True else "no" if v is False else str(v))  # noqa: E731
    for r in result["scenarios"]:
        lines.append("| " + " | ".join([r["scenario"], r["tried"].replace("|", "\\|"), r["outcome"].replace("|", "\\|"),
                                          cell(r["rows_in"]), cell(r["rows_out"]), cell(r["lost"]),
                                          cell(r["same_as_uninterrupted"]), cell(r["ok"])]) + " |")
    failed = [r["scenario"] for r in result["scenarios"] if not r["ok"]]
    lines += ["", f"{result['n_ok']} of {result['n']} scenarios passed; {result['rows_lost']} input rows lost in all."
              + (f" Failed: {', '.join(failed)}." if failed else ""),
              "\"Rows accounted for\" counts rows found, as their own text, in kept + removed + invalid.jsonl (— for "
              "rows lost: the run stopped with an error and wrote no outputs; inputs are never modified); \"same as "
              "uninterrupted\" compares scores.jsonl byte for byte (fine-tuning: the adapter's weights within 1e-6; the "
              "experiment: results.json's rows, seconds and load aside)."]
    return "\n".join(lines) + "\n"
