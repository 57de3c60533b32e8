"""Harmful-sample scorers on a feature matrix, by name.

Every detector is a scikit-learn estimator with `fit(X, y=None)` and `score_samples(X)`, where a higher score
means more likely harmful. Detectors import no torch.
"""

from __future__ import annotations

import difflib

from .subspace import SubspaceScorer

DETECTORS = {
    "subspace": SubspaceScorer,
}


def get_detector(name: str, **params):
    """Build a registered detector: `get_detector("subspace", n_components=2)`."""
    if name not in DETECTORS:
        close = difflib.get_close_matches(name, DETECTORS, n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        raise ValueError(f"Unknown detector {name!r}.{hint} Available: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](**params)


__all__ = ["DETECTORS", "SubspaceScorer", "get_detector"]
