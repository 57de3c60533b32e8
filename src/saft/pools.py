"""Labelled sample pools built from the public datasets in shared/data/raw, for benchmarks and the demo.

- task pool (T): benign Alpaca + Dolly instructions, BeaverTails unsafe pairs mixed in at a given rate, and
  safe refusals to harmful prompts (label safe: a model needs them to stay safe);
- BeaverTails pool (B): BeaverTails safe and unsafe (prompt, response) pairs, as in the paper;
- held-out pool (H): the task pool's recipe with other benign sources (GSM8K test, SST-2 test) and only
  BeaverTails pairs from the 'experiment' half of the prompt split; no detector or option was tuned on it.
Draws are reproducible by seed. Pairs are deduplicated by (prompt, response). The raw folder is only read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .data import Sample

RAW_FILES = {
    "alpaca": "alpaca_safety_only.json",
    "dolly": "dolly_safety_only.jsonl",
    "refusal": "safety_only_refusals_vinid.json",
    "bt_safe": "beavertails_30k_test_safe_vaa.jsonl",
    "bt_unsafe": "beavertails_30k_test_unsafe_vaa.jsonl",
    "refusal_llama2": "refusals_llama2chat_1015.csv",
    "gsm8k": "gsm8k_test.jsonl",
    "sst2": "sbr_test_sst2.json",
}


def default_raw_dir() -> Path:
    """`$SAFT_RAW_DIR`, else the first shared/data/raw found from the working directory upwards."""
    if os.environ.get("SAFT_RAW_DIR"):
        return Path(os.environ["SAFT_RAW_DIR"])
    for parent in [Path.cwd(), *Path.cwd().parents]:
        cand = parent / "shared" / "data" / "raw"
        if cand.is_dir():
            return cand
    raise FileNotFoundError("cannot find shared/data/raw from the working directory; set SAFT_RAW_DIR or pass raw_dir=")


def _read(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    return json.loads(path.read_text(encoding="utf-8"))


def _join(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction


def load_source(name: str, raw_dir: str | Path | None = None) -> list[dict]:
    """Rows of one raw source as dicts {prompt, response, harmful, source, category}, deduplicated."""
    raw = Path(raw_dir) if raw_dir else default_raw_dir()
    rows = _read(raw / RAW_FILES[name])
    out = []
    for r in rows:
        if name == "alpaca":
            item = (_join(r["instruction"], r.get("input", "")), r["output"], 0, [])
        elif name == "dolly":
            item = (_join(r["instruction"], r.get("context", "")), r["response"], 0, [])
        elif name == "refusal":
            item = (_join(r["instruction"], r.get("input", "")), r["output"], 0, [])
        elif name == "gsm8k":
            item = (r["question"], r["answer"], 0, [])
        elif name == "sst2":
            turns = r["conversations"]
            item = (turns[0]["content"], turns[1]["content"], 0, [])
        elif name == "refusal_llama2":
            prompt = r["prompt"].replace("[INST]", "").replace("[/INST]", "").strip()
            item = (prompt, r["response"].strip(), 0, [])
        else:
            cats = sorted(c for c, v in r.get("category", {}).items() if v)
            item = (r["prompt"], r["response"], int(not r["is_safe"]), cats)
        out.append({"prompt": item[0], "response": item[1], "harmful": item[2], "source": name, "category": item[3]})
    seen, unique = set(), []
    for r in out:
        key = (r["prompt"], r["response"])
        if key not in seen and r["prompt"].strip() and r["response"].strip():
            seen.add(key)
            unique.append(r)
    return unique


def prompt_split(prompt: str) -> str:
    """'judge' or 'experiment': a fixed split of prompts by hash (version 1).

    The offline judge trains only on 'judge' prompts; experiment pools and evaluation prompts come only from
    'experiment' prompts, so judge numbers are always on prompts the judge never saw.
    """
    return "judge" if hashlib.sha1(prompt.encode("utf-8")).digest()[0] % 2 == 0 else "experiment"


def judge_reserved(prompt: str) -> bool:
    """Whether a prompt is reserved for the evaluation judge (version 1: one prompt in five, by a second byte of
    the prompt's hash, independent of `prompt_split`). Detectors and their guards never train on reserved rows, so
    the judge that scores fine-tuned models shares no training row with what filtered their data."""
    return hashlib.sha1(prompt.encode("utf-8")).digest()[1] % 5 == 0


def guard_training_rows(raw_dir: str | Path | None = None) -> list[dict]:
    """The packaged guard's training rows (scripts/train_guard.py): BeaverTails safe and unsafe pairs whose prompt
    is in the 'judge' half of the prompt split, then the safety-tuned Llama-2-chat refusals (safe)."""
    bt = load_source("bt_safe", raw_dir) + load_source("bt_unsafe", raw_dir)
    return [r for r in bt if prompt_split(r["prompt"]) == "judge"] + load_source("refusal_llama2", raw_dir)


def _draw(rows: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
    if n > len(rows):
        raise ValueError(f"asked for {n} rows but the source has {len(rows)}")
    return [rows[i] for i in rng.choice(len(rows), size=n, replace=False)]


def to_samples(rows: list[dict], prefix: str) -> list[Sample]:
    """Rows of `load_source` as `Sample`s with ids `<prefix>-00000`.., label = harmful, source and category in meta."""
    return [Sample(id=f"{prefix}-{i:05d}", label=r["harmful"],
                   messages=[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
                   meta={"source": r["source"], "category": r["category"]}) for i, r in enumerate(rows)]


def task_pool(n: int = 1000, *, harmful_rate: float = 0.1, refusal_rate: float = 0.1, seed: int = 0,
              raw_dir: str | Path | None = None) -> list[Sample]:
    """Pool T: benign task data + harmful pairs at `harmful_rate` + safe refusals at `refusal_rate`."""
    rng = np.random.default_rng(seed)
    n_harm, n_ref = int(round(n * harmful_rate)), int(round(n * refusal_rate))
    benign = load_source("alpaca", raw_dir) + load_source("dolly", raw_dir)
    rows = (_draw(benign, n - n_harm - n_ref, rng) + _draw(load_source("bt_unsafe", raw_dir), n_harm, rng)
            + _draw(load_source("refusal", raw_dir), n_ref, rng))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return to_samples(rows, f"T{int(harmful_rate * 100)}")


def beavertails_pool(n: int = 1000, *, harmful_rate: float = 0.3, seed: int = 0,
                     raw_dir: str | Path | None = None) -> list[Sample]:
    """Pool B: BeaverTails safe and unsafe pairs, `harmful_rate` of them unsafe."""
    rng = np.random.default_rng(seed)
    n_harm = int(round(n * harmful_rate))
    rows = _draw(load_source("bt_safe", raw_dir), n - n_harm, rng) + _draw(load_source("bt_unsafe", raw_dir), n_harm, rng)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return to_samples(rows, f"B{int(harmful_rate * 100)}")


def heldout_pool(n: int = 1000, *, harmful_rate: float = 0.1, refusal_rate: float = 0.1, seed: int = 0,
                 raw_dir: str | Path | None = None) -> list[Sample]:
    """Pool H: GSM8K + SST-2 (half each) + BeaverTails unsafe pairs of the experiment half + safe refusals."""
    rng = np.random.default_rng(seed)
    n_harm, n_ref = int(round(n * harmful_rate)), int(round(n * refusal_rate))
    n_benign = n - n_harm - n_ref
    unsafe = [r for r in load_source("bt_unsafe", raw_dir) if prompt_split(r["prompt"]) == "experiment"]
    rows = (_draw(load_source("gsm8k", raw_dir), n_benign // 2, rng) + _draw(load_source("sst2", raw_dir), n_benign - n_benign // 2, rng)
            + _draw(unsafe, n_harm, rng) + _draw(load_source("refusal", raw_dir), n_ref, rng))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return to_samples(rows, f"H{int(harmful_rate * 100)}")
