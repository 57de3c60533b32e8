"""From harm scores to a removal mask, with the threshold that was applied.

Rules:
- `select_by_f1`: the paper's rule. Over candidate score sets (one per k, or per any other setting) and 100
  evenly spaced thresholds from the minimum to the maximum labelled score, pick the pair with the best F1 on
  the labelled samples; ties go to the earlier candidate and the lower threshold.
- `select_fraction`: remove a given fraction of the pool, highest scores first.
- `select_threshold`: remove every sample whose score exceeds a fixed threshold.
- `select_calibrated` (labels, not in the paper): map scores to probabilities with a logistic fit on the
  labelled rows (Platt scaling); their pool mean is a contamination estimate, and the rule removes that many
  rows, highest scores first. It uses every pool score, not only the labelled ones, so the removed count moves
  less with the label draw than under the F1 rule; a
  label-free estimate given as a prior (worth `prior_weight` labels) steadies it further, at full weight while the
  labels agree with it and less the more they contradict it (`prior_agreement`): when they conflict, the labels win.
  It removes `MARGIN` standard errors of the estimate more than the estimated count, as a missed harmful row costs
  more than a removed safe one.
- `select_certified` (a random labelled sample, not in the paper): the largest kept set whose harmful share is
  certified at most ALPHA with probability 1 - delta (`saft.certify`).
- `select_estimate` (label-free, not in the paper): remove the top `estimate` share of the pool, where the
  estimate comes from the detector itself (the guard's adjusted classify-and-count), and `MARGIN` of its
  standard errors more, for the same reason.
A sample is removed when its score is strictly greater than the threshold. `RULES` names them, each with what
it needs; `select(name, inputs)` applies one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
from sklearn.metrics import f1_score

from .detectors.base import ContaminationEstimate


# How many labels the calibrated rule's prior (a label-free contamination estimate) counts as, by default;
# chosen on benchmark pools and checked on fresh draws (docs/detectors/labelled.md).
PRIOR_WEIGHT = 100.0
# The calibrated rule keeps the prior's full weight while the labels are consistent with it at this level (the
# two-sided p-value of `prior_agreement`); below it the weight falls in proportion to the p-value, to 0.
PRIOR_TEST_LEVEL = 0.05
# Inverse strength of the Platt fit's L2 penalty on its slope. sklearn's default (1) shrinks the slope of a fit on
# 30 labelled rows enough to flatten the probabilities and bias their mean (benchmarks/suites/labels.py, 30 chosen
# rows: contamination-estimate error 0.025/0.073/0.086 at C 1 against 0.009/0.041/0.035 at C 100 on T10/B10/J10);
# 100 leaves the fit nearly unpenalised yet finite when the labelled rows are separable.
PLATT_C = 100.0
# Where the calibrated rule cuts: "count" removes the estimated number of harmful rows; "f1" the count that
# maximises the F1 expected under the calibrated probabilities. The expected-F1 optimum trusts the probabilities'
# shape, and a Platt fit on 30-100 labels over a weak ranking gets it wrong: on the labels suite's eight pools
# (30 chosen labels) it removed 0.009-0.256 of the pool more or fewer rows than were harmful, against 0.007-0.061
# for the estimated count, and its true F1 was lower on 5 of 8 pools, equal on 2, higher on J30 (0.605 vs 0.572).
CUT = "count"
# How far past the estimated harmful count the calibrated rule removes, in standard errors of the estimate (the
# share estimated from the labels and the prior's weight in labels, sqrt(t(1 - t) / (n_labels + weight))); 1.28 is
# the one-sided 90% upper bound. A missed harmful row costs more than a removed safe one: on the end-to-end
# experiment (docs/aligned-base.md), an aligned model fine-tuned on a pool that kept 6-9 of 96 harmful rows
# answered 0.01-0.06 more held-out harmful prompts harmfully than one trained on the safe rows only, while 13-17
# more safe rows removed from 224 left its helpfulness (ROUGE-L, reference loss) within noise. The margin cut
# the harmful rows kept there from 6-9 to 1-4 at 30% (3 seeds) and from 5-8 to 0-3 at 10% (2 seeds). On pools of
# the six source families, each scored by a guard that never learned from it (benchmarks/suites/detection.py,
# 10% and 30% harmful, 30 chosen or 100 random labels), the share of harmful rows kept fell by 0.00-0.20 and the
# share of safe rows removed rose by 0.03-0.08. The label-free rule removes as many of its own estimate's standard
# errors (the count's sampling noise) past its estimate: on the experiment's 30% pools (5 seeds) it kept 4-14
# harmful rows of 96 and recovered 84% of the oracle's reduction, against 11-22 and 74% at the estimate; on the
# left-out families' pools (300 rows; means over a family's pools at one rate) the share of harmful rows kept fell
# by 0.00-0.19 and the share of safe rows removed rose by 0.003-0.10, at 0% harmful by 0.003-0.03. 0 removes the
# estimated count.
MARGIN = 1.2816


def check_margin(margin: float) -> None:
    """A margin in standard errors is a finite number at least 0."""
    if not 0 <= margin < float("inf"):
        raise ValueError(f"margin must be a finite number at least 0, got {margin}")


@dataclass
class Selection:
    """Which samples to remove, why, and the threshold used (reusable on new data)."""

    removed: np.ndarray  # (n,) bool
    threshold: float
    rule: str
    params: dict = field(default_factory=dict)

    @property
    def n_removed(self) -> int:
        return int(self.removed.sum())

    def reason(self, score: float) -> str:
        return f"harm_score {score:.6g} > threshold {self.threshold:.6g} ({self.rule})"


def draw_labeled(labels: Sequence[int | None], n: int, *, seed: int = 0) -> np.ndarray:
    """Indices of `n` labelled rows drawn without replacement, reproducibly by `seed`."""
    known = np.array([i for i, lab in enumerate(labels) if lab is not None])
    if n < 1:
        raise ValueError(f"the number of labelled samples must be at least 1, got {n}")
    if len(known) < n:
        raise ValueError(f"the F1 rule needs {n} labelled samples but the pool has {len(known)} labelled rows; "
                         "lower --n-labels, add a label field (is_safe, label or harmful; or --label-field), or "
                         "pass --labels-file")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(known, size=n, replace=False))


def select_by_f1(pool_scores: Mapping[Hashable, np.ndarray], val_scores: Mapping[Hashable, np.ndarray],
                 val_labels: Sequence[int], *, n_thresholds: int = 100) -> Selection:
    """The paper's rule: jointly pick a candidate (e.g. k) and a threshold by F1 on labelled samples.

    `pool_scores[c]` are the pool's scores under candidate c, `val_scores[c]` the labelled samples' scores.
    """
    y = np.asarray(val_labels, dtype=int)
    if set(pool_scores) != set(val_scores):
        raise ValueError("pool_scores and val_scores must have the same candidates")
    if y.sum() == 0:
        raise ValueError("the labelled samples hold no harmful example, so F1 is undefined; draw more labels")
    best = None
    for cand in pool_scores:
        v = np.asarray(val_scores[cand])
        for tau in np.linspace(v.min(), v.max(), n_thresholds):
            f1 = f1_score(y, (v > tau).astype(int), zero_division=0)
            if best is None or f1 > best[0]:
                best = (f1, cand, float(tau))
    f1, cand, tau = best
    scores = np.asarray(pool_scores[cand])
    return Selection(scores > tau, tau, "f1", {"candidate": cand, "val_f1": float(f1), "n_labels": len(y),
                                               "n_thresholds": n_thresholds})


def select_fraction(scores: np.ndarray, *, fraction: float) -> Selection:
    """Remove the `fraction` of samples with the highest scores (rounded to the nearest count)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    scores = np.asarray(scores)
    m = int(round(fraction * len(scores)))
    order = np.argsort(-scores, kind="stable")
    removed = np.zeros(len(scores), dtype=bool)
    removed[order[:m]] = True
    # The largest kept score: everything removed is above it (up to ties).
    threshold = float(scores[~removed].max()) if (~removed).any() else float(scores.min())
    return Selection(removed, threshold, "fraction", {"fraction": fraction})


def select_threshold(scores: np.ndarray, *, threshold: float) -> Selection:
    scores = np.asarray(scores)
    return Selection(scores > threshold, float(threshold), "threshold", {})


def select_estimate(scores: np.ndarray, *, estimate: ContaminationEstimate, margin: float = MARGIN) -> Selection:
    """Remove the highest-scoring share of the pool given by a label-free contamination estimate and `margin` of
    its standard errors more (when it has one), never more than the upper end of its interval when it has one
    (its standard error and interval are reported)."""
    if not 0 <= estimate.value <= 1:
        raise ValueError(f"a contamination estimate must be in [0, 1], got {estimate.value}")
    check_margin(margin)
    share = estimate.value + margin * (estimate.se or 0.0)
    if estimate.interval is not None:
        share = min(share, estimate.interval[1])
    sel = select_fraction(scores, fraction=min(share, 1 - 1e-9))
    return Selection(sel.removed, sel.threshold, "estimate", {**estimate.as_dict(), "margin": margin})


def prior_agreement(pool_logit: np.ndarray, val_logit: np.ndarray, val_labels: Sequence[int], prior: float) -> float:
    """Two-sided p-value of the labels under the prior: how likely a harmful count as far from the expected one.

    The Platt log-odds of every pool row are shifted by one constant until their pool mean is `prior`; under that
    model the labelled rows are independent Bernoulli draws with those probabilities, so their harmful count is
    Poisson-binomial (computed exactly). The test reads the labelled rows through their scores, so it holds for
    rows chosen by score (`saft.label.choose_rows`) as for a random draw, whose harmful share alone would not.
    """
    from scipy.optimize import brentq
    from scipy.special import expit

    y = np.asarray(val_labels, dtype=int)
    n_pool = len(pool_logit)
    target = float(np.clip(prior, 1.0 / (n_pool + 1), n_pool / (n_pool + 1)))
    shift = brentq(lambda d: expit(pool_logit + d).mean() - target, -60.0, 60.0)
    q = expit(np.asarray(val_logit, dtype=np.float64) + shift)
    pmf = np.ones(1)
    for qi in q:  # the Poisson-binomial pmf by convolution: O(n^2), 0.1 s for 2000 labels
        pmf = np.convolve(pmf, [1 - qi, qi])
    k = int(y.sum())
    return float(min(1.0, 2 * min(pmf[:k + 1].sum(), pmf[k:].sum())))


def select_calibrated(scores: np.ndarray, val_scores: np.ndarray, val_labels: Sequence[int], *,
                      prior: float | None = None, prior_weight: float = 0.0,
                      test_level: float = PRIOR_TEST_LEVEL, platt_c: float = PLATT_C, cut: str = CUT,
                      margin: float = MARGIN) -> Selection:
    """Remove the estimated number of harmful rows and `margin` standard errors of that estimate more, highest
    scores first, the estimate being the pool mean of Platt-calibrated probabilities (`cut` "f1": the top m rows
    maximising the F1 expected under them instead; the margin applies to the count only).

    `prior`, a label-free contamination estimate of the pool (the guard's), counts as `prior_weight` extra labels:
    the probabilities are shifted by one constant on the log-odds scale until their pool mean is
    (n_labels * Platt mean + prior_weight * prior) / (n_labels + prior_weight). The Platt mean follows the harmful
    share of the labelled rows, whose sampling noise (0.17 across five draws of 100 on a pool with 30% harmful)
    would otherwise move the removed count by as much; the prior damps it at the price of the estimate's bias.
    The prior's weight is `prior_weight` while the labels agree with it (`prior_agreement`'s p-value at least
    `test_level`) and `prior_weight * p / test_level` below: a label-free estimate far from what the labels say
    (on data unlike the guard's) loses its say instead of dragging the result halfway. `test_level` 0 keeps the
    full weight always.
    """
    from scipy.optimize import brentq
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression

    if cut not in ("f1", "count"):
        raise ValueError(f"cut must be 'f1' or 'count', got {cut!r}")
    check_margin(margin)
    y = np.asarray(val_labels, dtype=int)
    if not 0 < y.sum() < len(y):
        raise ValueError("the calibrated rule needs harmful and safe rows among the labelled samples; draw more labels")
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be at least 0, got {prior_weight}")
    if prior_weight > 0 and (prior is None or not 0 <= prior <= 1):
        raise ValueError(f"prior_weight > 0 needs a prior contamination estimate in [0, 1], got {prior!r}")
    scores = np.asarray(scores, dtype=np.float64)
    platt = LogisticRegression(C=platt_c).fit(np.asarray(val_scores, dtype=np.float64).reshape(-1, 1), y)
    logit = platt.decision_function(scores.reshape(-1, 1))
    p = expit(logit)
    params = {"n_labels": len(y)}
    weight = 0.0
    if not 0 <= test_level < 1:
        raise ValueError(f"test_level must be in [0, 1), got {test_level}")
    if prior_weight > 0:
        val_logit = platt.decision_function(np.asarray(val_scores, dtype=np.float64).reshape(-1, 1))
        agreement = prior_agreement(logit, val_logit, y, prior)
        weight = prior_weight * (min(1.0, agreement / test_level) if test_level > 0 else 1.0)
        target = (len(y) * p.mean() + weight * prior) / (len(y) + weight)
        # Keep the target inside (0, 1) so that a finite shift reaches it; the mean is monotone in the shift.
        target = float(np.clip(target, 1.0 / (len(scores) + 1), len(scores) / (len(scores) + 1)))
        shift = brentq(lambda d: expit(logit + d).mean() - target, -60.0, 60.0)
        params.update({"platt_estimate": float(p.mean()), "prior_estimate": float(prior), "prior_weight": float(prior_weight),
                       "prior_agreement_p": agreement, "prior_weight_used": float(weight)})
        p = expit(logit + shift)
    order = np.argsort(-scores, kind="stable")
    expected_tp = np.cumsum(p[order])
    expected_f1 = 2 * expected_tp / (np.arange(1, len(scores) + 1) + p.sum())
    if cut == "f1":
        m = int(np.argmax(expected_f1)) + 1
    else:  # the labels hold a harmful row, so the pool has one
        t = float(p.mean())
        se = float(np.sqrt(t * (1 - t) / (len(y) + weight)))
        m = min(len(scores), max(1, int(round(len(scores) * (t + margin * se)))))
        params.update({"margin": float(margin), "contamination_estimate_se": se})
    removed = np.zeros(len(scores), dtype=bool)
    removed[order[:m]] = True
    threshold = float(scores[~removed].max()) if (~removed).any() else float(scores.min())
    return Selection(removed, threshold, "calibrated", {"contamination_estimate": float(p.mean()),
                                                        "expected_f1": float(expected_f1[m - 1]), **params})


def select_certified(scores: np.ndarray, labelled_idx: Sequence[int], labels: Sequence[int], *, alpha: float,
                     delta: float, strata: Sequence[Hashable] | None = None) -> Selection:
    """Keep the largest set certified at most `alpha` harmful with probability 1 - `delta` (`saft.certify`);
    the labelled rows must be a uniformly random sample of the pool. Raises `CertificationRefused` (a
    ValueError) with the reason when no cutoff can be certified."""
    from .certify import certify_cutoff

    cert = certify_cutoff(scores, labelled_idx, labels, alpha=alpha, delta=delta, strata=strata)
    scores = np.asarray(scores)
    threshold = float(scores[cert.kept].max())
    return Selection(~cert.kept, threshold, "certify", {
        "alpha": alpha, "delta": delta, "n_labels": len(labels), "reason": cert.reason(),
        "strata": [dataclasses.asdict(s) for s in cert.strata]})


@dataclass
class RuleInputs:
    """What a selection rule may read: the pool's scores by candidate (one entry, unless the f1 rule searches the
    paper's k), the labelled rows' scores and labels, the detector's label-free estimate, and the options."""

    scores: Mapping[Hashable, np.ndarray]
    labelled_scores: Mapping[Hashable, np.ndarray] | None = None
    labels: Sequence[int] | None = None
    estimate: ContaminationEstimate | None = None
    fraction: float | None = None
    threshold: float | None = None
    n_thresholds: int = 100
    prior_weight: float = PRIOR_WEIGHT
    margin: float = MARGIN
    labelled_idx: Sequence[int] | None = None  # the labelled rows' positions in the pool, when they are pool rows
    alpha: float | None = None
    delta: float = 0.1
    strata: Sequence[Hashable] | None = None

    def only(self, mapping: Mapping[Hashable, np.ndarray]) -> np.ndarray:
        return next(iter(mapping.values()))


@dataclass(frozen=True)
class Rule:
    """A selection rule: `apply(inputs) -> Selection`; `labels`: it needs labelled rows; `estimate`: it needs the
    detector's label-free contamination estimate; `label_free`: the detector's scores must not have seen the
    labels (they test the scores)."""

    apply: Callable[[RuleInputs], Selection]
    purpose: str
    labels: bool = False
    estimate: bool = False
    label_free: bool = False


def _calibrated(i: RuleInputs) -> Selection:
    prior = {} if i.estimate is None or i.prior_weight <= 0 else {"prior": i.estimate.value, "prior_weight": i.prior_weight}
    return select_calibrated(i.only(i.scores), i.only(i.labelled_scores), i.labels, margin=i.margin, **prior)


def _none(i: RuleInputs) -> Selection:
    return Selection(np.zeros(len(i.only(i.scores)), dtype=bool), float("inf"), "none", {})


RULES: dict[str, Rule] = {
    "f1": Rule(lambda i: select_by_f1(i.scores, i.labelled_scores, i.labels, n_thresholds=i.n_thresholds),
               "the paper's: the candidate and threshold with the best F1 on the labelled rows", labels=True),
    "calibrated": Rule(_calibrated, "labels: Platt-calibrated scores, remove the estimated harmful count and a margin",
                       labels=True),
    "estimate": Rule(lambda i: select_estimate(i.only(i.scores), estimate=i.estimate, margin=i.margin),
                     "label-free: remove the detector's own contamination estimate and a margin", estimate=True,
                     label_free=True),
    "certify": Rule(lambda i: select_certified(i.only(i.scores), i.labelled_idx, i.labels, alpha=i.alpha,
                                               delta=i.delta, strata=i.strata),
                    "a random labelled sample: the largest kept set certified at most alpha harmful", labels=True,
                    label_free=True),
    "fraction": Rule(lambda i: select_fraction(i.only(i.scores), fraction=i.fraction),
                     "remove a given fraction, highest scores first"),
    "threshold": Rule(lambda i: select_threshold(i.only(i.scores), threshold=i.threshold),
                      "remove every score above a given threshold"),
    "none": Rule(_none, "remove nothing (scores only)"),
}


def select(rule: str, inputs: RuleInputs) -> Selection:
    """Apply the named rule of `RULES`."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
    return RULES[rule].apply(inputs)
