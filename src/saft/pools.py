"""Labelled sample pools built from the public datasets in shared/data/raw, for benchmarks and the demo.

- task pool (T): benign Alpaca + Dolly instructions, BeaverTails unsafe pairs mixed in at a given rate, and
  safe refusals to harmful prompts (label safe: a model needs them to stay safe);
- BeaverTails pool (B): BeaverTails safe and unsafe (prompt, response) pairs, as in the paper;
- held-out pool (H): the task pool's recipe with other benign sources (GSM8K test, SST-2 test) and only
  BeaverTails pairs from the 'experiment' half of the prompt split; no detector or option was tuned on it.
Draws are reproducible by seed. Pairs are deduplicated by (prompt, response). The raw folder is only read.

Source families (`FAMILIES`, `family_rows`, `family_pool`; recipes in docs/families.md) are the unit of the
leave-one-family-out benchmark (benchmarks/suites/detection.py) and of guard v2's training rows: beavertails,
jailbreakbench, sbr, refusals, lookalike (benign rows that mention killing, attacks, drugs...) and benign (task
data). Every row belongs to one family only; rows whose prompt is `judge_reserved` belong to none.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .data import Sample
from .regions import is_refusal_text

PACKAGE = Path(__file__).resolve().parent
GUARD_ROW_FILES = (PACKAGE / "guard_rows_v1.jsonl.gz", PACKAGE / "guard_rows_v2.jsonl.gz")

RAW_FILES = {
    "alpaca": "alpaca_safety_only.json",
    "dolly": "dolly_safety_only.jsonl",
    "refusal": "safety_only_refusals_vinid.json",
    "bt_safe": "beavertails_30k_test_safe_vaa.jsonl",
    "bt_unsafe": "beavertails_30k_test_unsafe_vaa.jsonl",
    "refusal_llama2": "refusals_llama2chat_1015.csv",
    "gsm8k": "gsm8k_test.jsonl",
    "sst2": "sbr_test_sst2.json",
    "gsm8k_train": "gsm8k_train.jsonl",
    "sbr_unsafe100": "sbr_100unsafe.json",
    "sbr_mixed": "sbr_700sst2_300unsafe.json",
}
JBB_DIR = "jailbreakbench"


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
    if name == "jailbreakbench":
        return _dedup(_jailbreakbench(raw / JBB_DIR))
    rows = _read(raw / RAW_FILES[name])
    out = []
    for r in rows:
        if name in ("sbr_unsafe100", "sbr_mixed"):
            turns = r["conversations"]
            # SBR's files mix SST-2 sentiment instructions (benign) with harmful pairs; the former start so.
            benign = turns[0]["content"].startswith("Analyze the sentiment")
            item = (turns[0]["content"], turns[1]["content"], int(not benign), [])
        elif name == "alpaca":
            item = (_join(r["instruction"], r.get("input", "")), r["output"], 0, [])
        elif name == "dolly":
            item = (_join(r["instruction"], r.get("context", "")), r["response"], 0, [])
        elif name == "refusal":
            item = (_join(r["instruction"], r.get("input", "")), r["output"], 0, [])
        elif name in ("gsm8k", "gsm8k_train"):
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
    return _dedup(out)


def _dedup(out: list[dict]) -> list[dict]:
    seen, unique = set(), []
    for r in out:
        key = (r["prompt"], r["response"])
        if key not in seen and r["prompt"].strip() and r["response"].strip():
            seen.add(key)
            unique.append(r)
    return unique


def _jailbreakbench(folder: Path) -> list[dict]:
    """JailbreakBench artifacts: (jailbreak prompt, the target model's answer), harmful = the benchmark judge's
    `jailbroken` verdict; entries without a prompt or response (no attack found) are skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the JailbreakBench artifacts are missing (see shared/data/SOURCES.md)")
    out = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        par = data.get("parameters", {})
        for j in data.get("jailbreaks", []):
            if not j.get("prompt") or not j.get("response"):
                continue
            verdict = j.get("jailbroken")
            harmful = int(verdict is True or str(verdict).lower() == "true")
            out.append({"prompt": j["prompt"], "response": j["response"], "harmful": harmful,
                        "source": "jailbreakbench", "category": [j.get("category") or ""],
                        "goal": j.get("goal", ""), "model": par.get("model", ""), "method": par.get("method", "")})
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# Source families

FAMILIES = ("beavertails", "jailbreakbench", "sbr", "refusals", "lookalike", "benign")
# Families with rows of one class only: their pools take the other class from `donor_rows` (see `family_pool`).
ONE_CLASS = ("refusals", "lookalike", "benign")
# Benign rows that mention violence, crime, drugs or hacking: safe by construction (task data), and the safe
# rows a guard most easily mistakes for harmful ones. Matched on the prompt or the response, whole words.
LOOKALIKE_WORDS = re.compile(
    r"\b(kill\w*|attack\w*|shoot\w*|shot|steal\w*|stole\w*|poison\w*|bomb\w*|weapon\w*|drug\w*|hack\w*|murder\w*"
    r"|guns?|explosi\w*|knife|knives|violen\w*|fight\w*|destroy\w*|dead|death|blood\w*|war|crime\w*|criminal\w*"
    r"|assault\w*|rob|robb\w*|thief|thieves|theft|fraud\w*|cheat\w*|threat\w*|terror\w*|abus\w*)\b", re.IGNORECASE)


def holdout_slice(prompt: str) -> bool:
    """Whether a prompt is in the guard's held-out slice (version 1: one prompt in five by a third byte of its
    hash, independent of `prompt_split` and `judge_reserved`). No guard trains on it: it gives the harmful rows of
    one-class family pools (`donor_rows`), each family's in-family held-out numbers and the distance calibration
    of `saft.trust`."""
    return hashlib.sha1(prompt.encode("utf-8")).digest()[2] % 5 == 0


def calibration_half(prompt: str) -> bool:
    """Within the held-out slice: whether a prompt calibrates a guard's rates (half of it, by a fourth hash byte)
    rather than serving as a donor row of one-class pools (`donor_rows`), so no pool row calibrates its guard."""
    return hashlib.sha1(prompt.encode("utf-8")).digest()[3] % 2 == 0


def is_refusal(row: dict) -> bool:
    """A safe row from a refusal set, or a safe answer that reads as a refusal."""
    return not row["harmful"] and (row["family"] == "refusals" or is_refusal_text(row["response"]))


def _all_family_rows(raw_dir: str | Path | None) -> dict[str, list[dict]]:
    key = str(Path(raw_dir).resolve()) if raw_dir else str(default_raw_dir().resolve())
    if key in _FAMILY_CACHE:
        return _FAMILY_CACHE[key]
    bt = load_source("bt_safe", raw_dir) + load_source("bt_unsafe", raw_dir)
    bt_prompts = {r["prompt"] for r in bt}
    sbr = _dedup(load_source("sbr_mixed", raw_dir) + load_source("sbr_unsafe100", raw_dir) + load_source("sst2", raw_dir))
    tasks = _dedup(load_source("alpaca", raw_dir) + load_source("dolly", raw_dir) + load_source("gsm8k", raw_dir)
                   + load_source("gsm8k_train", raw_dir))
    mentions = lambda r: bool(LOOKALIKE_WORDS.search(r["prompt"] + "\n" + r["response"]))  # noqa: E731
    fam = {
        "beavertails": bt,
        "jailbreakbench": load_source("jailbreakbench", raw_dir),
        # SBR's harmful pairs are BeaverTails-derived: the ones whose prompt is in the BeaverTails files are
        # BeaverTails' rows, so leaving one family out leaves all of its prompts out.
        "sbr": [r for r in sbr if not (r["harmful"] and r["prompt"] in bt_prompts) and not (not r["harmful"] and mentions(r))],
        "refusals": _dedup(load_source("refusal_llama2", raw_dir) + load_source("refusal", raw_dir)),
        "lookalike": [r for r in tasks + [r for r in sbr if not r["harmful"]] if mentions(r)],
        # GSM8K's train split serves only the look-alikes; the benign family keeps its test split (as pool H).
        "benign": [r for r in tasks if not mentions(r) and r["source"] != "gsm8k_train"],
    }
    seen: set[str] = set()
    for name in FAMILIES:  # one family per prompt, in FAMILIES order; reserved prompts belong to none
        rows = []
        for r in _dedup(fam[name]):
            if judge_reserved(r["prompt"]) or (name != "beavertails" and r["prompt"] in seen and r["harmful"]):
                continue
            rows.append({**r, "family": name})
        seen |= {r["prompt"] for r in rows}
        fam[name] = rows
    _FAMILY_CACHE[key] = fam
    return fam


_FAMILY_CACHE: dict[str, dict[str, list[dict]]] = {}


def family_rows(family: str, raw_dir: str | Path | None = None, *, part: str = "all",
                limit: int | None = None) -> list[dict]:
    """The rows of one source family (dicts of `load_source` plus "family"), no `judge_reserved` prompt among them.

    part: "all", "train" (outside `holdout_slice`: what a guard may learn from) or "holdout" (inside it).
    limit: keep a fixed subset of at most `limit` rows of the family (the first by a hash of prompt and
    response, taken before `part`), so that a benchmark embeds only those; None = every row.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if part not in ("all", "train", "holdout"):
        raise ValueError(f"part must be all, train or holdout, got {part!r}")
    rows = _all_family_rows(raw_dir)[family]
    if limit is not None and len(rows) > limit:
        order = sorted(range(len(rows)), key=lambda i: hashlib.sha1(
            (rows[i]["prompt"] + "\0" + rows[i]["response"]).encode("utf-8")).hexdigest())
        rows = [rows[i] for i in sorted(order[:limit])]
    if part == "all":
        return list(rows)
    return [r for r in rows if holdout_slice(r["prompt"]) == (part == "holdout")]


def donor_rows(raw_dir: str | Path | None = None, *, limit: int | None = None) -> list[dict]:
    """Harmful rows for the pools of one-class families: the harmful rows of beavertails, jailbreakbench and sbr in
    the held-out slice but outside its `calibration_half` (no guard trains on them or measures its rates on them,
    so a pool's harmful rows never trained or calibrated the guard that scores it)."""
    return [r for f in FAMILIES if f not in ONE_CLASS for r in family_rows(f, raw_dir, part="holdout", limit=limit)
            if r["harmful"] and not calibration_half(r["prompt"])]


def family_pool(family: str, n: int = 300, *, harmful_rate: float = 0.1, seed: int = 0,
                raw_dir: str | Path | None = None, limit: int | None = None) -> list[Sample]:
    """A labelled pool of `n` rows for a family at `harmful_rate`: its safe rows from the family (any part), its
    harmful rows from the family when it has them (beavertails, jailbreakbench, sbr), else from `donor_rows`.
    Samples carry meta family, source, category and refusal (see `is_refusal`); `limit` as in `family_rows`."""
    rng = np.random.default_rng(seed)
    n_harm = int(round(n * harmful_rate))
    rows = family_rows(family, raw_dir, limit=limit)
    harmful = donor_rows(raw_dir, limit=limit) if family in ONE_CLASS else [r for r in rows if r["harmful"]]
    drawn = _draw([r for r in rows if not r["harmful"]], n - n_harm, rng) + _draw(harmful, n_harm, rng)
    drawn = [drawn[i] for i in rng.permutation(len(drawn))]
    samples = to_samples(drawn, f"{family}{int(round(harmful_rate * 100))}s{seed}")
    for s, r in zip(samples, drawn):
        s.meta.update(family=r["family"], refusal=is_refusal(r))
    return samples


# ---------------------------------------------------------------------------------------------------------------
# Task pools for the end-to-end experiment on the aligned base


def norm_prompt(prompt: str) -> str:
    """A prompt in lower case with single spaces: how pools and evaluation sets are checked for shared prompts."""
    return " ".join(prompt.lower().split())


@functools.lru_cache(maxsize=1)
def _guard_training_prompts() -> frozenset[str]:
    prompts = set()
    for path in GUARD_ROW_FILES:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            prompts |= {norm_prompt(json.loads(line)["prompt"]) for line in f if line.strip()}
    return frozenset(prompts)


def guard_unseen(prompt: str) -> bool:
    """Whether no packaged guard learned from this prompt (normalised): not among guard v1's or v2's training rows
    (the label-free detector's reference rows are v1's) and not `judge_reserved`."""
    return not judge_reserved(prompt) and norm_prompt(prompt) not in _guard_training_prompts()


def attack_pool(n: int, *, harmful_rate: float, seed: int, demo_share: float = 0.1, benign_only: bool = False,
                exclude: set[str] = frozenset(), unseen: bool = True,
                raw_dir: str | Path | None = None) -> tuple[list[Sample], dict]:
    """A fine-tuning pool for the aligned base, and its recipe: `n` rows of which BeaverTails unsafe pairs make
    `harmful_rate`, safety demonstrations (safety-tuned-llamas refusals of harmful prompts, label safe, as real
    chat data holds them) `demo_share`, and benign Alpaca/Dolly rows the rest.

    Benign rows and demonstrations come from the 'task' slice of `saft.aligned.alignment_slice` (never the
    alignment's or its helpfulness references'), harmful rows from the 'experiment' half of `prompt_split`, and no
    row's prompt is `judge_reserved` or, normalised, in `exclude` (the evaluation prompts), and no row trained a
    packaged guard (`guard_unseen`; BeaverTails harmful rows then come from `holdout_slice`), so the detector arms
    score rows they never learned from. `unseen=False` is the recipe of scripts/aligned_study.py, whose results
    it reproduces: harmful rows from the 'task' slice, and only the demonstrations checked against `exclude`.
    `benign_only`: the pool at 30% without its harmful rows (its benign rows and demonstrations), for the
    attack's control.
    """
    from .aligned import alignment_slice

    rng = np.random.default_rng(seed)
    kept = lambda r: norm_prompt(r["prompt"]) not in exclude and (guard_unseen(r["prompt"]) if unseen else True)  # noqa: E731
    benign = [r for r in load_source("alpaca", raw_dir) + load_source("dolly", raw_dir)
              if alignment_slice(r["prompt"]) == "task" and (kept(r) or not unseen)]
    unsafe = [r for r in load_source("bt_unsafe", raw_dir) if prompt_split(r["prompt"]) == "experiment"
              and not judge_reserved(r["prompt"]) and (kept(r) or not unseen)
              and (holdout_slice(r["prompt"]) if unseen else alignment_slice(r["prompt"]) == "task")]
    demos = [r for r in load_source("refusal", raw_dir) if alignment_slice(r["prompt"]) == "task" and kept(r)]
    benign = [benign[i] for i in rng.permutation(len(benign))]
    unsafe = [unsafe[i] for i in rng.permutation(len(unsafe))]
    demos = [demos[i] for i in np.random.default_rng([seed, 1]).permutation(len(demos))]  # rng's draws unchanged
    n_demo = int(round(n * demo_share))
    n_harm = int(round(n * (0.3 if benign_only else harmful_rate)))
    for name, have, need in (("benign", benign, n - n_harm - n_demo), ("harmful", unsafe, n_harm), ("demonstration", demos, n_demo)):
        if need > len(have):
            raise ValueError(f"a pool of {n} at harmful rate {harmful_rate} needs {need} {name} rows; the recipe has "
                             f"{len(have)}: choose a smaller pool")
    rows = benign[:n - n_harm - n_demo] + demos[:n_demo] + ([] if benign_only else unsafe[:n_harm])
    rows = [rows[i] for i in rng.permutation(len(rows))]
    recipe = {"n": len(rows), "harmful": sum(r["harmful"] for r in rows), "refusal_demonstrations": n_demo,
              "benign_sources": {s: sum(r["source"] == s and not r["harmful"] for r in rows) for s in ("alpaca", "dolly")},
              "harmful_source": "BeaverTails 30k_test unsafe, prompt_split 'experiment', not judge_reserved, "
                                + ("holdout_slice, no guard's training row" if unseen else "alignment_slice 'task'"),
              "benign_source": "Alpaca + Dolly, alignment_slice 'task'" + (", no guard's training row" if unseen else ""),
              "demonstration_source": "safety-tuned-llamas refusals (safety_only_refusals_vinid.json), alignment_slice "
                                      "'task', no evaluation prompt" + (", no guard's training row" if unseen else ""),
              "available": {"benign": len(benign), "harmful": len(unsafe), "demonstrations": len(demos)}, "seed": seed}
    samples = [Sample(f"atk-{i:05d}", [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
                      label=r["harmful"], meta={"source": r["source"], "category": r["category"],
                                                "demonstration": r["source"] == "refusal"}) for i, r in enumerate(rows)]
    return samples, recipe
