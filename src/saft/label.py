"""Label rows in the terminal: chosen rows for the calibrated rule, or a random sample for the certificate.

Two tools, two samples:
- chosen (`choose_rows`, the default of `saft label`): a few rows (30) picked from the detector's scores to pin
  down the removed count: half spread evenly over the pool's score ranks (they fix the calibration, hence the
  contamination estimate, as a stratified sample does), half spread over the ranks around the label-free
  estimate's cutoff (they fix where harmful turns safe). `saft filter --labels-file` reads them with the
  calibrated rule. They are not a random sample: no statistical guarantee comes from them.
- random (`--random`): a uniformly random sample of the pool, drawn without replacement by a seed; what
  `saft filter --certify ALPHA --labels-file` needs for its guarantee (`saft.certify`), and what any unbiased
  estimate of the pool's harmful share needs.

`label_session` shows one row at a time (prompt, response, score) and reads one key per answer: h harmful,
s safe, k skip, u undo, q quit (in a terminal, single keypresses; from a pipe, one character each, whitespace
ignored; the end of input quits). After every answer the labels file and its session file (`<output>.session.json`:
the plan, the skips and the history for undo) are rewritten atomically, so a session stopped anywhere resumes
where it stopped when run again with the same output. The labels file is JSONL, one row per answered sample:
`{"id", "prompt", "response", "harmful": 1 or 0, "score", "selection": "chosen" or "random"}`, which
`load_samples` (and so `--labels-file`) reads as prompt/response rows labelled by `harmful`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from .data import DataError, atomic_open, load_samples, write_json

logger = logging.getLogger(__name__)

KEYS = {"h": "harmful", "1": "harmful", "s": "safe", "0": "safe", "k": "skip", "u": "undo", "q": "quit"}
HELP = "[h] harmful  [s] safe  [k] skip  [u] undo  [q] quit"
SELECTIONS = ("chosen", "random")
FOCUS = 0.5  # share of chosen rows around the estimate's cutoff; the rest spread over every rank
SHOW_CHARS = 1500  # longer prompts and responses are cut for display (the labels file keeps them whole)


def choose_rows(scores: np.ndarray, *, n: int, estimate: float | None = None, focus: float = FOCUS,
                width: float | None = None, seed: int = 0) -> np.ndarray:
    """Positions of the `n` rows whose labels best pin down the calibrated rule's cutoff and contamination.

    Rows are picked by rank (order of `scores`), one at random inside each of a set of equal rank strata:
    - `n - round(focus * n)` strata over the whole pool: a stratified sample, whose labelled share tracks the
      calibration over every score, as the contamination estimate (the mean calibrated probability) needs;
    - `round(focus * n)` strata over the ranks around the cutoff of `estimate` (a label-free estimate of the
      harmful share: the top `estimate` of the pool would go), `width` of the pool on either side (default:
      max(estimate, 0.1) / 2), where the calibration's slope and position decide the removed count.
    Without `estimate` every row goes to the pool-wide strata. Positions come out in a seeded random order, so a
    session stopped early still holds a spread of scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    N = len(scores)
    if not 1 <= n <= N:
        raise ValueError(f"n must be between 1 and the number of rows ({N}), got {n}")
    if not 0 <= focus <= 1:
        raise ValueError(f"focus must be in [0, 1], got {focus}")
    if estimate is not None and not 0 <= estimate <= 1:
        raise ValueError(f"estimate must be in [0, 1], got {estimate}")
    rng = np.random.default_rng(seed)
    order = np.argsort(scores, kind="stable")  # rank r -> position
    n_focus = 0 if estimate is None else int(round(focus * n))
    picked: list[int] = []

    def strata(lo: int, hi: int, k: int):
        """One random rank inside each of k equal strata of ranks [lo, hi), skipping ranks already picked."""
        edges = [lo + -(-j * (hi - lo) // k) for j in range(k + 1)]  # ceil(lo + j (hi - lo) / k), exactly
        for a, b in zip(edges[:-1], edges[1:]):
            ranks = [r for r in range(a, b) if r < N and order[r] not in taken]
            if not ranks:  # stratum already used by the other part: the nearest free rank
                free = [r for r in range(N) if order[r] not in taken]
                ranks = [min(free, key=lambda r: abs(r - (a + b) / 2))]
            r = int(rng.choice(ranks))
            taken.add(int(order[r]))
            picked.append(int(order[r]))

    taken: set[int] = set()
    if n_focus:
        w = (max(estimate, 0.1) / 2) if width is None else width
        cut = (1 - estimate) * N  # ranks at or above `cut` are the top `estimate` share
        lo, hi = int(max(0, np.floor(cut - w * N))), int(min(N, np.ceil(cut + w * N)))
        strata(lo, max(hi, lo + n_focus), n_focus)
    strata(0, N, n - n_focus)
    return np.array(picked, dtype=int)[rng.permutation(n)]


def random_rows(n_rows: int, *, seed: int = 0) -> np.ndarray:
    """Every position in a seeded uniformly random order: its first n rows are a random sample of n."""
    return np.random.default_rng(seed).permutation(n_rows)


def read_key(stream: TextIO) -> str | None:
    """One key: a single keypress from a terminal, else the next non-blank character; None at end of input."""
    if stream.isatty():
        import termios
        import tty

        fd = stream.fileno()
        old = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd)
            ch = os.read(fd, 1).decode(errors="replace")
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
        return ch or None
    while True:
        ch = stream.read(1)
        if ch == "":
            return None
        if not ch.isspace():
            return ch


def _cut(text: str) -> str:
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + f" ... ({len(text) - SHOW_CHARS} more characters)"


@dataclass
class SessionResult:
    output: Path
    n_labelled: int
    n_harmful: int
    n_skipped: int
    complete: bool  # the target number of labels was reached


def _state_path(output: Path) -> Path:
    return output.with_name(output.name + ".session.json")


def label_session(samples: Sequence, scores: np.ndarray | None, plan: Sequence[int], output: str | os.PathLike, *,
                  n: int, selection: str, keys: TextIO | None = None, out: TextIO | None = None,
                  source: str | None = None, resume: bool = True) -> SessionResult:
    """Ask for labels of `samples[plan[0]], samples[plan[1]], ...` until `n` are labelled; save after each.

    `plan` lists the rows to show in order (for `selection` "random", every row in random order; for "chosen",
    the chosen rows: a skipped one is replaced by the unplanned row nearest in score). `scores` are shown and
    saved when given. With `resume` and an existing session file beside `output`, the session goes on from it
    (its plan, answers and skips win over `plan`); `source` (the data file) must then match.
    """
    keys = keys if keys is not None else sys.stdin
    out = out if out is not None else sys.stdout
    output = Path(output)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    ids = [s.id for s in samples]
    pos_of = {sid: i for i, sid in enumerate(ids)}
    state_path = _state_path(output)
    if resume and state_path.exists():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if source is not None and state.get("source") != str(source):
            raise DataError(f"{state_path}: a session on {state.get('source')}, not {source}; pass another -o "
                            "or delete the session file to start again")
        missing = [sid for sid in state["queue"] if sid not in pos_of]
        if missing:
            raise DataError(f"{state_path}: row id {missing[0]!r} of the session is not in the data any more; pass "
                            "another -o to start a new session")
        if state["selection"] != selection:
            raise DataError(f"{state_path}: a {state['selection']} session; rerun without changing --random, "
                            "or pass another -o")
        labelled = {}
        if output.exists():
            for line in output.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    labelled[row["id"]] = row
        state["n"] = n
        logger.info("resuming %s: %d labelled, %d skipped", output, len(labelled), len(state["skipped"]))
    else:
        if output.exists():
            raise DataError(f"{output} exists but has no session file ({state_path.name}); pass another -o, "
                            "or move the file away")
        state = {"source": None if source is None else str(source), "selection": selection, "n": n,
                 "queue": [ids[int(i)] for i in plan], "skipped": [], "history": [],
                 "scores": None if scores is None else [float(v) for v in scores]}
        labelled = {}
    rank = None if scores is None else np.argsort(np.argsort(scores, kind="stable"), kind="stable")

    def save():
        with atomic_open(output) as f:
            for sid in [h[0] for h in state["history"] if h[1] == "label"]:
                f.write(json.dumps(labelled[sid], ensure_ascii=False) + "\n")
        write_json(state, state_path)

    def replacement(sid: str) -> str | None:
        """The row nearest in score to `sid` that is neither planned nor answered (chosen sessions)."""
        if scores is None or selection != "chosen":
            return None
        used = set(state["queue"])
        free = [i for i in range(len(ids)) if ids[i] not in used]
        if not free:
            return None
        s = scores[pos_of[sid]]
        return ids[min(free, key=lambda i: abs(scores[i] - s))]

    if not state_path.exists():
        save()
    while True:
        done = set(labelled) | set(state["skipped"])
        if len(labelled) >= state["n"]:
            out.write(f"\n{len(labelled)} labels in {output}; done.\n")
            break
        current = next((sid for sid in state["queue"] if sid not in done), None)
        if current is None:
            out.write(f"\nno rows left to show; {len(labelled)} labels in {output}.\n")
            break
        i = pos_of[current]
        sample = samples[i]
        score = "" if scores is None else f"   score {scores[i]:.4g} (rank {len(ids) - rank[i]} of {len(ids)}, 1 = most harmful-looking)"
        out.write(f"\n[{len(labelled) + 1}/{state['n']}] row {current}{score}\n"
                  f"PROMPT:\n{_cut(sample.prompt)}\nRESPONSE:\n{_cut(sample.response)}\n{HELP} > ")
        out.flush()
        while True:
            key = read_key(keys)
            action = "quit" if key is None else KEYS.get(key.lower())
            if action is not None:
                break
            out.write(f"\n(unknown key {key!r}) {HELP} > ")
            out.flush()
        out.write(f"{action}\n")
        if action == "quit":
            out.write(f"saved {len(labelled)} labels in {output}; run the same command to resume.\n")
            break
        if action == "undo":
            if not state["history"]:
                out.write("nothing to undo\n")
                continue
            sid, kind, *extra = state["history"].pop()
            if kind == "label":
                labelled.pop(sid)
            else:
                state["skipped"].remove(sid)
                for q in extra:  # the skip's replacement goes with it, unless answered since
                    if q not in labelled and q not in state["skipped"]:
                        state["queue"].remove(q)
            # Rows before it in the queue are all answered, so it is the next one shown.
            state["queue"].remove(sid)
            first_open = next((j for j, q in enumerate(state["queue"]) if q not in set(labelled) | set(state["skipped"])),
                              len(state["queue"]))
            state["queue"].insert(first_open, sid)
        elif action == "skip":
            state["skipped"].append(current)
            extra = replacement(current)
            state["history"].append([current, "skip"] + ([] if extra is None else [extra]))
            if extra is not None:
                state["queue"].insert(state["queue"].index(current) + 1, extra)
        else:
            labelled[current] = {"id": current, "prompt": sample.prompt, "response": sample.response,
                                 "harmful": int(action == "harmful"),
                                 "score": None if scores is None else float(scores[i]), "selection": selection}
            state["history"].append([current, "label"])
        save()
    return SessionResult(output, len(labelled), sum(r["harmful"] for r in labelled.values()), len(state["skipped"]),
                         len(labelled) >= state["n"])


def label_dataset(path, output, *, n: int = 30, random: bool = False, detector: str = "guard", seed: int = 0,
                  fields=None, skip_invalid: bool = False, keys: TextIO | None = None, out: TextIO | None = None,
                  progress: bool = True, cache_dir: str | None = None) -> SessionResult:
    """What `saft label` runs: load the data, choose the rows (or draw a random sample), run the session.

    Chosen rows need the scores of `detector` (a label-free one: `guard` reads the sentence view only and loads
    no model) and its contamination estimate; a random sample needs no scores. A session file beside `output`
    resumes without scoring again.
    """
    from .pipeline import FilterConfig, filter_dataset

    output = Path(output)
    dataset = load_samples(path, fields=fields, skip_invalid=skip_invalid)
    state_path = _state_path(output)
    scores, plan = None, None
    if state_path.exists():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        scores = np.array(state["scores"]) if state.get("scores") is not None else None
        if scores is not None and len(scores) != len(dataset):
            raise DataError(f"{state_path}: a session on {len(scores)} rows but {path} has {len(dataset)}; "
                            "pass another -o")
    elif random:
        plan = random_rows(len(dataset), seed=seed)
    else:
        config = FilterConfig(detector=detector, rule="estimate", seed=seed, cache_dir=cache_dir)
        result = filter_dataset(path, config=config, fields=fields, skip_invalid=skip_invalid, progress=progress)
        scores = result.scores
        estimate = result.selection.params["contamination_estimate"]
        plan = choose_rows(scores, n=n, estimate=estimate, seed=seed)
        logger.info("label-free estimate %.3f; chose %d rows", estimate, n)
    if plan is None:
        plan = []
    # The session file keeps the scores, so a resumed session shows and replaces rows as the first one did.
    return label_session(dataset.samples, scores, plan, output, n=n, selection="random" if random else "chosen",
                         keys=keys, out=out, source=str(Path(path).resolve()))
