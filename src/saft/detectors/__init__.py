"""Harmful-sample detectors, by name: what each is for, what it reads and how it is fitted.

Every detector follows one protocol (`saft.detectors.base`): `fit(X, y=None, *, reference_X=None,
reference_y=None)`, `score_samples(X)` (higher = more likely harmful) and, where it can, `contamination_estimate(X)`
(the guard's detectors also take the rows' refusal mask, `refusal=`, in both).
Its `DetectorSpec` says everything the pipeline needs to know about it, so the pipeline holds no per-detector
case: the view it reads, whether it learns from labels or from the guard's rows, the selection rule it gets by
default, and the token positions of its hidden states. Detectors import no torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .base import ContaminationEstimate
from .guard import GuardScorer
from .guided import ModelGuidedProbeScorer
from .model_guard import ModelGuardScorer
from .subspace import SubspaceScorer

VIEWS = ("llm", "sentence", "both")


@dataclass(frozen=True)
class DetectorSpec:
    """A registered detector.

    `view`: "llm" (the fine-tuned model's hidden states, `saft.features`), "sentence" (the sentence-encoder view,
    `saft.encoders`; the language model is not loaded) or "both" (the sentence view's columns, then the hidden
    states at each of `positions`). `labels`: fit needs labelled rows. `reference`: fit trains on the guard's
    labelled rows in the same view (`saft.reference`). `rule`: the selection rule `--rule auto` gives it.
    `positions`: hidden-state positions read after the configured one (each once). `searched`: the parameter
    the f1 rule searches over `k_candidates` (the paper's k).
    """

    cls: type
    purpose: str
    view: str = "llm"
    labels: bool = False
    reference: bool = False
    rule: str = "f1"
    positions: tuple[str, ...] = ()
    searched: str | None = None


DETECTORS: dict[str, DetectorSpec] = {
    "subspace": DetectorSpec(
        SubspaceScorer, "the paper's method: energy in the pool's top singular directions; k and threshold by F1 "
        "on 100 labels", view="llm", rule="f1", searched="n_components"),
    "guard": DetectorSpec(
        GuardScorer, "fast, model-free: a packaged harm classifier on sentence embeddings; removes its own "
        "contamination estimate", view="sentence", rule="estimate"),
    "label-free": DetectorSpec(
        ModelGuardScorer, "the default without labels: the guard's classifier retrained in the model's own view, "
        "plus a probe on the pool", view="both", reference=True, rule="estimate",
        positions=("prompt_last", "response_mean")),
    "labelled": DetectorSpec(
        ModelGuidedProbeScorer, "the default with 100 or more labels: a probe on the model's features guided by "
        "label-free's scores", view="both", labels=True, reference=True, rule="calibrated",
        positions=("prompt_last", "response_mean")),
}
# Names that no longer exist, with what to use instead.
RETIRED = {"guard-model": "label-free", "guard-model-probe": "labelled", "guard-knn": "label-free",
           "guard-student": "label-free", "guard-probe": "labelled", "probe": "labelled"}


def get_spec(name: str) -> DetectorSpec:
    """The registered detector `name`, or a ValueError that lists the names and suggests one."""
    if name in DETECTORS:
        return DETECTORS[name]
    if name in RETIRED:
        raise ValueError(f"detector {name!r} is no longer available; use {RETIRED[name]!r}. "
                         f"Available: {', '.join(DETECTORS)}")
    close = difflib.get_close_matches(name, DETECTORS, n=1)
    hint = f" Did you mean: {close[0]}?" if close else ""
    raise ValueError(f"Unknown detector {name!r}.{hint} Available: {', '.join(DETECTORS)}")


def get_detector(name: str, **params):
    """Build a registered detector: `get_detector("subspace", n_components=2)`."""
    return get_spec(name).cls(**params)


def detector_positions(name: str, position: str) -> list[str]:
    """The token positions whose hidden states the named detector reads, given the configured `position`: that
    one first, then the others its spec names, once each."""
    return [position] + [p for p in get_spec(name).positions if p != position]


__all__ = ["DETECTORS", "RETIRED", "VIEWS", "ContaminationEstimate", "DetectorSpec", "GuardScorer",
           "ModelGuardScorer", "ModelGuidedProbeScorer", "SubspaceScorer", "detector_positions", "get_detector",
           "get_spec"]
