"""Detection metrics of harm scores and a removal mask against known labels (1 = harmful)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score


def detection_metrics(scores: np.ndarray, labels: Sequence[int | None], removed: np.ndarray | None = None) -> dict:
    """AUROC/AUPRC of `scores`, and F1/precision/recall and harmful fractions of `removed`, on labelled rows.

    Rows whose label is None are ignored. Metrics that need both classes are None when one is missing.
    """
    known = np.array([lab is not None for lab in labels])
    y = np.array([lab for lab in labels if lab is not None], dtype=int)
    out: dict = {"n_labeled": int(known.sum())}
    if not known.any():
        return out
    s = np.asarray(scores)[known]
    both = 0 < y.sum() < len(y)
    out["auroc"] = float(roc_auc_score(y, s)) if both else None
    out["auprc"] = float(average_precision_score(y, s)) if both else None
    out["harmful_fraction_before"] = float(y.mean())
    if removed is not None:
        r = np.asarray(removed, dtype=bool)[known]
        p, rc, f1, _ = precision_recall_fscore_support(y, r.astype(int), average="binary", zero_division=0)
        out.update(precision=float(p), recall=float(rc), f1=float(f1),
                   harmful_fraction_after=float(y[~r].mean()) if (~r).any() else None,
                   harmful_removed=int((y[r] == 1).sum()), safe_removed=int((y[r] == 0).sum()))
    return out
