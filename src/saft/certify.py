"""A certified cutoff: the kept set is at most ALPHA harmful with probability 1 - delta over the labelled draw.

The guarantee needs labels on a uniformly random sample of the pool's rows (drawn without replacement, e.g. by
`saft label --random`), and scores that were fixed before the labels were seen (a label-free detector). It holds
for the pool itself (a finite population), whatever the detector's quality, with no assumption on the scores'
distribution. A good detector makes the certified kept set large; a bad one makes it small or makes the method
refuse.

Method: Learn-then-Test (Angelopoulos et al., 2021) with an exact finite-population p-value. Rows are kept from
the lowest score up; kept set K_k is the k lowest-scoring rows. For a fixed sequence of k (from a strict start
upward), the null hypothesis H_k is "K_k holds more than ALPHA * k harmful rows". Given how many labelled rows
fall in K_k (n_k), those rows are a uniform sample of K_k without replacement, so their harmful count x_k is
hypergeometric; the p-value is P(X <= x_k) at the least harmful count the null allows, floor(ALPHA * k) + 1
(the probability only grows as that count falls). The walk rejects H_k while p <= delta and stops at the first
k it cannot: fixed-sequence testing controls the chance of any false certificate at delta, with no correction,
because a later k is only tested once every earlier one was rejected. The largest rejected k is the certified
kept set. The start is the smallest kept set that is expected to hold enough labelled rows to be certified even
with none harmful, computed from the numbers of rows and labels alone (never from the labels).

Strata (e.g. harmful-looking and benign-looking prompts): each gets its own cutoff and ALPHA, the walks run at
delta / number of strata each, so every stratum's statement holds together with probability 1 - delta. A safe
refusal to a harmful prompt scores low within its stratum and is kept by construction, instead of competing
with benign rows under a single cutoff. The strata must be decided without the labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import numpy as np

DELTA = 0.1  # default probability that a certificate is wrong
N_STEPS = 200  # kept-set sizes tried per stratum, evenly spaced from the start to the whole stratum
START_MULT = 2.0  # the walk starts where the kept set is expected to hold START_MULT times the labels a clean set needs


class CertificationRefused(ValueError):
    """No cutoff can be certified; the message says why and what would help."""


@dataclass
class StratumCertificate:
    name: str
    alpha: float
    delta: float
    n_rows: int
    n_labels: int
    n_kept: int  # 0 when nothing could be certified
    cutoff: float | None  # the largest kept score (rows at or below it are kept)
    p_value: float | None  # at the certified kept set
    labelled_in_kept: int
    harmful_labelled_in_kept: int
    reason: str

    @property
    def certified(self) -> bool:
        return self.n_kept > 0


@dataclass
class Certificate:
    kept: np.ndarray  # (n,) bool
    strata: list[StratumCertificate] = field(default_factory=list)

    @property
    def certified(self) -> bool:
        return all(s.certified for s in self.strata)

    def reason(self) -> str:
        return "; ".join(f"{s.name}: {s.reason}" for s in self.strata)


def min_labels_in_kept(alpha: float, delta: float) -> int:
    """Labelled rows a kept set must hold to be certified at (alpha, delta) when none of them is harmful:
    the smallest m with (1 - alpha)^m <= delta (the hypergeometric tail is smaller still)."""
    if alpha >= 1:
        return 0
    return max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))


def p_values(k, n_k, x_k, alpha: float) -> np.ndarray:
    """Exact p-values of "the k kept rows hold more than alpha * k harmful" from x_k harmful among n_k labelled
    kept rows drawn uniformly without replacement (arrays of the same length, one test each)."""
    from scipy.stats import hypergeom

    k, n_k, x_k = (np.asarray(v, dtype=np.int64) for v in (k, n_k, x_k))
    d0 = np.floor(alpha * k + 1e-12).astype(np.int64) + 1  # the least harmful count the null allows
    possible = d0 <= k  # else the null is impossible: every kept set is at most alpha harmful
    p = np.zeros(len(k))
    p[possible] = hypergeom.cdf(x_k[possible], k[possible], d0[possible], n_k[possible])
    return p


def _walk(name: str, scores: np.ndarray, labelled: np.ndarray, y: np.ndarray, *, alpha: float, delta: float,
          n_steps: int) -> tuple[np.ndarray, StratumCertificate]:
    """One stratum: `labelled` are positions into `scores` with labels `y`. Returns (kept mask, certificate)."""
    n, m = len(scores), len(labelled)
    order = np.argsort(scores, kind="stable")
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    lab_rank = np.sort(rank[labelled])
    harm_rank = np.sort(rank[labelled[y == 1]])
    need = min_labels_in_kept(alpha, delta)
    base = dict(name=name, alpha=alpha, delta=delta, n_rows=n, n_labels=m)
    if m < need:
        return np.zeros(n, bool), StratumCertificate(
            **base, n_kept=0, cutoff=None, p_value=None, labelled_in_kept=0, harmful_labelled_in_kept=0,
            reason=f"refused: {m} labelled rows, but even a kept set whose labelled rows are all safe needs "
                   f"{need} of them to be certified at alpha {alpha:g} with delta {delta:g}; label at least "
                   f"{math.ceil(need / 0.5)} random rows (more, the more of the pool is harmful)")
    # Start where the kept set is expected to hold START_MULT times the labelled rows a clean set needs (labelled rows fall
    # in a kept set in proportion to its size); fixed by n, m, alpha and delta only.
    start = min(n, max(1, math.ceil(n * START_MULT * need / m)))
    sizes = np.unique(np.linspace(start, n, min(n_steps, n - start + 1)).round().astype(int))
    n_k = np.searchsorted(lab_rank, sizes)  # labelled rows with rank < k, for every size at once
    x_k = np.searchsorted(harm_rank, sizes)
    p = p_values(sizes, n_k, x_k, alpha)
    fail = np.flatnonzero(p > delta)
    first_fail = int(fail[0]) if len(fail) else len(sizes)
    row = lambda j: (int(sizes[j]), int(n_k[j]), int(x_k[j]), float(p[j]))  # noqa: E731
    best = row(first_fail - 1) if first_fail > 0 else None
    last = row(first_fail) if first_fail < len(sizes) else None
    if best is None:
        k, n_k, x_k, p = last
        return np.zeros(n, bool), StratumCertificate(
            **base, n_kept=0, cutoff=None, p_value=p, labelled_in_kept=n_k, harmful_labelled_in_kept=x_k,
            reason=f"refused: the strictest cutoff tried keeps {k} rows, whose {n_k} labelled rows hold {x_k} "
                   f"harmful; p = {p:.3g} > delta {delta:g}, so not even it is certified at most {alpha:g} harmful "
                   "(more random labels, a larger alpha or delta, or a better detector would help)")
    k, n_k, x_k, p = best
    kept = np.zeros(n, bool)
    kept[order[:k]] = True
    stop = ("every size tried passed" if k == n else
            f"stopped before the next size tried ({last[0]} rows: p = {last[3]:.3g})")
    return kept, StratumCertificate(
        **base, n_kept=k, cutoff=float(scores[order[k - 1]]), p_value=p, labelled_in_kept=n_k,
        harmful_labelled_in_kept=x_k,
        reason=f"certified: keep the {k} lowest-scoring of {n} rows, at most {alpha:g} harmful with probability "
               f"{1 - delta:g} ({n_k} labelled kept rows, {x_k} harmful, p = {p:.3g}); {stop}")


def certify_cutoff(scores: np.ndarray, labelled_idx: Sequence[int], labels: Sequence[int], *, alpha: float,
                   delta: float = DELTA, strata: Sequence[Hashable] | None = None,
                   alphas: Mapping[Hashable, float] | None = None, n_steps: int = N_STEPS,
                   refuse: bool = True) -> Certificate:
    """The largest kept set (lowest scores first) certified at most `alpha` harmful with probability 1 - delta.

    `labelled_idx`: positions in `scores` of a uniformly random sample of the pool, `labels` their labels (1 =
    harmful). `strata`: one label-free stratum name per row (optional); `alphas` overrides `alpha` per stratum.
    Raises `CertificationRefused` when some stratum cannot be certified, with each stratum's reason (`refuse`
    False: returns the certificate, its `certified` False and the uncertified strata keeping nothing).
    """
    scores = np.asarray(scores, dtype=np.float64)
    idx = np.asarray(labelled_idx, dtype=int)
    y = np.asarray(labels, dtype=int)
    if len(idx) != len(y):
        raise ValueError(f"{len(idx)} labelled positions but {len(y)} labels")
    if len(np.unique(idx)) != len(idx):
        raise ValueError("a row is labelled twice; a random sample is drawn without replacement")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(scores)):
        raise ValueError("labelled positions must index the pool's rows")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0 (safe) or 1 (harmful)")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    groups = np.zeros(len(scores), dtype=object) if strata is None else np.asarray(list(strata), dtype=object)
    if len(groups) != len(scores):
        raise ValueError(f"{len(groups)} strata for {len(scores)} rows")
    names = sorted(set(groups.tolist()), key=str)
    alphas = dict(alphas or {})
    unknown = set(alphas) - set(names)
    if unknown:
        raise ValueError(f"alphas name strata that no row is in: {sorted(map(str, unknown))}")
    kept = np.zeros(len(scores), bool)
    certs = []
    for name in names:
        a = float(alphas.get(name, alpha))
        if not 0 < a <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {a} (stratum {name!r})")
        rows = np.flatnonzero(groups == name)
        in_stratum = np.isin(idx, rows)
        pos = np.searchsorted(rows, idx[in_stratum])
        k, cert = _walk("pool" if strata is None else str(name), scores[rows], pos, y[in_stratum], alpha=a,
                        delta=delta / len(names), n_steps=n_steps)
        kept[rows[k]] = True
        certs.append(cert)
    result = Certificate(kept, certs)
    if refuse and not result.certified:
        raise CertificationRefused(result.reason())
    return result
