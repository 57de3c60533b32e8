"""Harmful-sample scorers on a feature matrix, by name.

Every detector is a scikit-learn estimator with `fit(X, y=None)` and `score_samples(X)`, where a higher score
means more likely harmful. Detectors import no torch. A detector's class attribute `view` names the features it
reads: "llm" (hidden states of the model being fine-tuned, `saft.features`; the default), "sentence" (the
sentence-encoder view, `saft.encoders`) or "both" (the sentence view's columns, then the hidden states). Detectors with `contamination_estimate(X)` can pick their own
threshold without labels (the "estimate" selection rule). A detector with `needs_reference` (guard-model,
guard-model-probe) also
trains on the guard's labelled rows in the same view (`fit(X, reference_X=, reference_y=)`, `saft.reference`),
and one with a `positions` parameter reads hidden states at several positions, one block each.
"""

from __future__ import annotations

import difflib

from .guard import GuardKNNScorer, GuardScorer
from .guided import GuidedProbeScorer, ModelGuidedProbeScorer
from .model_guard import ModelGuardScorer
from .probe import ProbeScorer
from .student import GuardStudentScorer
from .subspace import SubspaceScorer

DETECTORS = {
    "subspace": SubspaceScorer,
    "probe": ProbeScorer,
    "guard": GuardScorer,
    "guard-knn": GuardKNNScorer,
    "guard-student": GuardStudentScorer,
    "guard-probe": GuidedProbeScorer,
    "guard-model": ModelGuardScorer,
    "guard-model-probe": ModelGuidedProbeScorer,
}
# Detectors whose fit needs labels (y with -1 for unlabelled rows).
NEEDS_LABELS = {"probe", "guard-probe", "guard-model-probe"}


def detector_view(name: str) -> str:
    """"llm", "sentence" or "both": which features the named detector reads."""
    return getattr(DETECTORS[name], "view", "llm")


def detector_positions(name: str, position: str) -> list[str]:
    """The token positions whose hidden states the named detector reads, given the configured `position`: that
    one, then (guard-model, guard-model-probe) the others its `positions` parameter names by default, once each."""
    defaults = DETECTORS[name]().get_params().get("positions", ()) if name in DETECTORS else ()
    return [position] + [p for p in defaults if p != position]


def needs_reference(name: str) -> bool:
    """Whether the named detector trains on the guard's labelled rows in the model's view (`saft.reference`)."""
    return bool(getattr(DETECTORS.get(name), "needs_reference", False))


def default_rule(name: str) -> str:
    """The selection rule `--rule auto` gives a detector: its own label-free estimate when it has one, the
    calibrated rule when it is trained on labels, else the paper's F1 rule."""
    if hasattr(DETECTORS[name], "contamination_estimate"):
        return "estimate"
    return "calibrated" if name in NEEDS_LABELS else "f1"


def own_estimate(detector, X) -> dict:
    """A fitted detector's label-free contamination estimate of X, with its standard error when the detector
    gives one, as keyword arguments of `saft.select.select_estimate`."""
    with_se = getattr(detector, "contamination_estimate_with_se", None)
    if with_se is None:
        return {"estimate": detector.contamination_estimate(X), "se": None}
    estimate, se = with_se(X)  # one pass: each fold model's decision values are computed once
    return {"estimate": estimate, "se": se}


def calibrated_prior(detector, X, weight: float) -> dict:
    """Keyword arguments of `saft.select.select_calibrated` for a fitted detector: its label-free estimate of X
    as the prior, counted as `weight` labels, when the detector has one (guard-probe); else none."""
    estimate = getattr(detector, "label_free_estimate_with_se", None)
    if estimate is None or weight <= 0:
        return {}
    return {"prior": estimate(X)[0], "prior_weight": weight}


def get_detector(name: str, **params):
    """Build a registered detector: `get_detector("subspace", n_components=2)`."""
    if name not in DETECTORS:
        close = difflib.get_close_matches(name, DETECTORS, n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        raise ValueError(f"Unknown detector {name!r}.{hint} Available: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](**params)


__all__ = ["DETECTORS", "NEEDS_LABELS", "GuardKNNScorer", "GuardScorer", "GuardStudentScorer", "GuidedProbeScorer",
           "ModelGuardScorer", "ModelGuidedProbeScorer", "ProbeScorer", "SubspaceScorer", "calibrated_prior", "default_rule", "detector_positions",
           "detector_view", "get_detector", "needs_reference", "own_estimate"]
