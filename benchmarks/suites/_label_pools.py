"""Pools, guard scores and the calibrated rule over label draws, shared by the labels, certify and detection
suites (not a suite itself: the name starts with _).

Every pool is a (name, samples) pair, so the per-family pools of `saft.pools` plug in by being appended to the
list `build_pools` returns. The pools here:
- T10, T30, B10, B30, H10, H30: `saft.pools.task_pool`, `beavertails_pool`, `heldout_pool` (1000 rows drawn
  with the seed, then restricted to the rows whose prompt the packaged guard never trained on, as the project's
  other benchmarks do);
- J10, J30 (a family the guard never saw): benign Alpaca + Dolly instructions, JailbreakBench attack artifacts
  whose answer the benchmark's judge called jailbroken (harmful, 10% or 30% of the pool) and 10% artifacts it
  called not jailbroken (safe: mostly refusals to an adversarial prompt). Built from shared/data/raw only.
Scores: the packaged guard (`GuardScorer`, RBF kernel) on the sentence view, cached under $SAFT_CACHE; prior:
the guard's label-free contamination estimate of the pool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from saft.data import Sample
from saft.detectors.guard import GuardScorer, guard_weights
from saft.encoders import sentence_features
from saft.pools import beavertails_pool, default_raw_dir, guard_training_rows, heldout_pool, load_source, task_pool

BASE_POOLS = ("T10", "T30", "B10", "B30", "H10", "H30", "J10", "J30")


def jailbreakbench_rows(raw_dir=None) -> list[dict]:
    """JailbreakBench artifacts with an answer, deduplicated by (prompt, response); harmful = the judge's verdict."""
    raw = Path(raw_dir) if raw_dir else default_raw_dir()
    seen, rows = set(), []
    for path in sorted((raw / "jailbreakbench").glob("*.json")):
        for j in json.loads(path.read_text(encoding="utf-8"))["jailbreaks"]:
            p, r = j.get("prompt"), j.get("response")
            if not p or not r or not str(p).strip() or not str(r).strip() or (p, r) in seen:
                continue
            seen.add((p, r))
            rows.append({"prompt": p, "response": r, "harmful": int(str(j["jailbroken"]).lower() == "true"),
                         "source": "jailbreakbench", "category": [j.get("category")]})
    return rows


def jailbreak_pool(n: int = 1000, *, harmful_rate: float = 0.1, safe_rate: float = 0.1, seed: int = 0,
                   raw_dir=None) -> list[Sample]:
    rng = np.random.default_rng(seed)
    jb = jailbreakbench_rows(raw_dir)
    harm = [r for r in jb if r["harmful"]]
    safe = [r for r in jb if not r["harmful"]]
    benign = load_source("alpaca", raw_dir) + load_source("dolly", raw_dir)
    n_h, n_s = int(round(n * harmful_rate)), int(round(n * safe_rate))
    pick = lambda rows, k: [rows[i] for i in rng.choice(len(rows), size=k, replace=False)]  # noqa: E731
    rows = pick(benign, n - n_h - n_s) + pick(harm, n_h) + pick(safe, n_s)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return [Sample(id=f"J{int(harmful_rate * 100)}-{i:05d}", label=r["harmful"],
                   messages=[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
                   meta={"source": r["source"], "category": r["category"]}) for i, r in enumerate(rows)]


def build_pools(names, *, seed: int = 0, n: int = 1000) -> list[tuple[str, list[Sample]]]:
    """(name, samples) for each name of BASE_POOLS, restricted to prompts guard v1 never trained on."""
    seen = {r["prompt"] for r in guard_training_rows(None)}
    makers = {"T": task_pool, "B": beavertails_pool, "H": heldout_pool, "J": jailbreak_pool}
    out = []
    for name in names:
        samples = makers[name[0]](n, harmful_rate=int(name[1:]) / 100, seed=seed)
        out.append((name, [s for s in samples if s.prompt not in seen]))
    return out


def guard_scores(samples: list[Sample]) -> tuple[np.ndarray, float]:
    """Guard v1's scores of `samples` (sentence view) and its label-free estimate of their share harmful."""
    cache = Path(os.environ.get("SAFT_CACHE", Path.home() / ".cache" / "saft")) / "sentence"
    X = sentence_features(samples, cache_dir=cache, progress=False)
    guard = GuardScorer(guard_weights("v1")).fit(X)
    return guard.score_samples(X), float(guard.contamination_estimate(X).value)


if __name__ == "__main__":  # precompute the sentence views of every base pool
    for name, samples in build_pools(BASE_POOLS):
        z, est = guard_scores(samples)
        y = np.array([s.label for s in samples])
        print(name, len(samples), f"truth {y.mean():.3f} estimate {est:.3f}", flush=True)


def margin_effect(harmful, at_count, with_margin) -> dict:
    """What a margin past the estimated count changes: the share of the harmful rows kept and of the safe rows
    removed, at the count and with the margin (`harmful`, `at_count`, `with_margin`: boolean masks; the harmful
    shares are None for a pool without harmful rows)."""
    out = {}
    for suffix, removed in (("", at_count), ("_margin", with_margin)):
        out["harmful_kept" + suffix] = float((harmful & ~removed).sum() / harmful.sum()) if harmful.any() else None
        out["safe_removed" + suffix] = float((~harmful & removed).sum() / (~harmful).sum())
    return out


def calibrated_draws(z: np.ndarray, y: np.ndarray, prior: float, pick, *, draws: int) -> dict:
    """The calibrated rule (`saft filter --labels-file`, the prior worth `PRIOR_WEIGHT` labels) over `draws` label
    draws: `pick(d)` gives draw d's labelled rows and the rule's extra options. The removal-count error
    |removed - harmful| / rows (mean and worst), the estimate's error and F1 of the removal (means) over the draws
    that did not refuse (labelled rows of one class), and the refusals. For the count cut, also what the default
    margin (`saft.select.MARGIN` standard errors past the count) changes: the share of harmful rows kept and of
    safe rows removed, at the count and with the margin (means)."""
    from sklearn.metrics import f1_score

    from saft.select import PRIOR_WEIGHT, select_calibrated

    errs, est_errs, f1s, refused = [], [], [], 0
    margin = {k: [] for k in ("harmful_kept", "harmful_kept_margin", "safe_removed", "safe_removed_margin")}
    harmful = y.astype(bool)
    for d in range(draws):
        idx, extra = pick(d)
        try:
            # the estimated count (margin 0): these suites measure how well the labels count
            sel = select_calibrated(z, z[idx], y[idx], prior=prior, prior_weight=PRIOR_WEIGHT,
                                    **{"margin": 0.0, **extra})
        except ValueError:  # the labelled rows hold one class only: the rule refuses, as the CLI does
            refused += 1
            continue
        errs.append(abs(sel.n_removed - y.sum()) / len(y))
        est_errs.append(abs(sel.params["contamination_estimate"] - y.mean()))
        f1s.append(f1_score(y, sel.removed, zero_division=0))
        if extra.get("cut", "count") == "count" and harmful.any():
            wide = select_calibrated(z, z[idx], y[idx], prior=prior, prior_weight=PRIOR_WEIGHT, **extra)
            for k, v in margin_effect(harmful, sel.removed, wide.removed).items():
                margin[k].append(v)
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return {"count_error": mean(errs), "count_error_max": float(np.max(errs)) if errs else None,
            "estimate_error": mean(est_errs), "f1": mean(f1s), "draws": len(errs), "refused": refused,
            **({"margin": {k: mean(v) for k, v in margin.items()}} if margin["harmful_kept"] else {})}
