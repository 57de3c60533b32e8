"""The region-wise adjusted count: the guard's contamination estimate done separately on the parts of a pool that
look like each of its source families, each with that part's own rates.

An adjusted count, (share above the threshold - fpr) / (tpr - fpr), is only as right as its fpr and tpr are for
the pool at hand, and the rates differ by an order of magnitude between kinds of rows: safe answers to risky
questions (BeaverTails) cross guard v2's threshold about one time in five, benign task rows (Alpaca, Dolly)
almost never. One pooled pair of rates therefore undercounts a pool of task rows with a few harmful answers
(the pooled fpr is subtracted from rows that have none: an estimate of 0 at 10% harmful) and overcounts a pool
of BeaverTails' own safe answers. Here every row gets a region: "refusal" when its response reads as a refusal
(`is_refusal_text`; refusals are safe and rarely flagged whatever their source), else the family a logistic
regression on the sentence view assigns it to. Each region's rates were measured on held-out rows given their
region the same way (so a misassignment is part of the rates), with the pooled rates where a region had fewer
than `MIN_ROWS` held-out rows of a class; the pool's estimate is the size-weighted sum of the regions' adjusted
counts. benchmarks/suites/detection.py measures it against the pooled count, on left-out and seen families.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

REFUSAL = "refusal"
MIN_ROWS = 30  # held-out rows of a class a region needs for its own rate; below, the pooled rate stands in
# A response that declines (its first 300 characters).
REFUSAL_PATTERN = re.compile(r"\b(I('m| am) (sorry|not able|unable)|I (cannot|can't|can not|won't|will not)|"
                             r"As an AI|I apologi[sz]e|not (appropriate|ethical))", re.IGNORECASE)


def is_refusal_text(response: str) -> bool:
    """Whether a response reads as a refusal (a keyword match on its first 300 characters)."""
    return bool(REFUSAL_PATTERN.search(response[:300]))


def refusal_mask(responses) -> np.ndarray:
    """`is_refusal_text` of each response (any iterable)."""
    return np.fromiter((is_refusal_text(r) for r in responses), dtype=bool)


@dataclass
class RegionModel:
    """Which family a row looks like: a multinomial logistic regression on the sentence view (its classes,
    coefficients and intercepts), with refusals set apart by their text."""

    classes: list[str]
    coef: np.ndarray  # (classes, columns)
    intercept: np.ndarray  # (classes,)

    def assign(self, X, refusal=None) -> np.ndarray:
        """Each row's region: REFUSAL where `refusal` (a boolean mask, or None) says so, else its family."""
        from .chunks import map_chunks

        best = map_chunks(lambda c: np.argmax(c @ self.coef.T + self.intercept, axis=1), X, 8192)
        regions = np.asarray(self.classes, dtype=object)[best.astype(int)] if len(best) else np.array([], dtype=object)
        if refusal is not None:
            refusal = np.asarray(refusal, dtype=bool)
            if refusal.shape != regions.shape:
                raise ValueError(f"refusal mask has {refusal.size} entries for {regions.size} rows")
            regions[refusal] = REFUSAL
        return regions

    def to_json(self) -> dict:
        return {"classes": list(self.classes), "coef": np.asarray(self.coef).tolist(),
                "intercept": np.asarray(self.intercept).tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "RegionModel":
        coef = np.asarray(d["coef"], dtype=np.float64)
        intercept = np.asarray(d["intercept"], dtype=np.float64)
        if coef.shape[0] != len(d["classes"]) or intercept.shape != (len(d["classes"]),):
            raise ValueError(f"region model: {len(d['classes'])} classes but coef {coef.shape} and intercept "
                             f"{intercept.shape}; rebuild the guard file with scripts/train_guard.py")
        return cls(list(d["classes"]), coef, intercept)


def fit_regions(X, families, *, C: float = 1.0) -> RegionModel:
    """The region model of a guard's training rows (sentence view X, each row's family)."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=C, max_iter=3000).fit(np.asarray(X, dtype=np.float64), np.asarray(families).astype(str))
    coef, intercept = lr.coef_, lr.intercept_
    if len(lr.classes_) == 2:  # sklearn keeps one row for two classes: spell out both sides
        coef, intercept = np.vstack([-coef[0], coef[0]]) / 2, np.array([-intercept[0], intercept[0]]) / 2
    return RegionModel([str(c) for c in lr.classes_], coef, intercept)


def region_rates(flagged, y, regions, *, fallback: tuple[float, float], min_rows: int = MIN_ROWS) -> dict:
    """region -> [tpr, fpr] of held-out rows (`flagged`: above the threshold; `y`: 1 = harmful; `regions`: as
    assigned), the `fallback` (tpr, fpr) for a class with fewer than `min_rows` rows in the region."""
    flagged, y, regions = np.asarray(flagged, dtype=bool), np.asarray(y), np.asarray(regions, dtype=object)
    out = {}
    for g in dict.fromkeys(regions.tolist()):
        m = regions == g
        s, h = flagged[m & (y == 0)], flagged[m & (y == 1)]
        out[str(g)] = [float(h.mean()) if len(h) >= min_rows else float(fallback[0]),
                       float(s.mean()) if len(s) >= min_rows else float(fallback[1])]
    return out


def _adjusted(share: float, rates, fallback) -> tuple[float, float]:
    """(adjusted count, its scale 1 / (tpr - fpr)) of one region: its own rates, else the fallback pair where they
    cannot separate (one of them may itself be a fallback), else the raw share."""
    for tpr, fpr in (rates, fallback):
        if tpr - fpr > 0:
            return float(np.clip((share - fpr) / (tpr - fpr), 0.0, 1.0)), 1.0 / (tpr - fpr)
    return share, 1.0


def region_estimate(flagged, regions, rates: dict, *, fallback: tuple[float, float], with_se: bool = False):
    """The harmful share of a pool: each region's adjusted count (clipped to [0, 1]) weighted by its size, with
    `rates` (region -> [tpr, fpr]) and the `fallback` rates for a region the held-out rows never reached.
    `with_se`: (share, the binomial standard error of the regions' counts, each scaled by its 1 / (tpr - fpr)).
    """
    flagged, regions = np.asarray(flagged, dtype=bool), np.asarray(regions, dtype=object)
    if not len(flagged):
        raise ValueError("cannot estimate the harmful share of an empty pool")
    total, variance = 0.0, 0.0
    for g in dict.fromkeys(regions.tolist()):
        m = regions == g
        share = float(flagged[m].mean())
        value, scale = _adjusted(share, rates.get(str(g), fallback), fallback)
        total += m.sum() * value
        variance += m.sum() * share * (1 - share) * scale ** 2
    value = total / len(flagged)
    return (value, float(np.sqrt(variance)) / len(flagged)) if with_se else value
