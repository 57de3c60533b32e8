import numpy as np
import pytest

from saft.metrics import detection_metrics
from saft.select import draw_labeled, select_by_f1, select_fraction, select_threshold


def test_f1_rule_picks_the_separating_candidate_and_threshold():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    good = y * 10 + rng.random(300)  # harmful above 10, safe below 1
    noise = rng.random(300)
    idx = draw_labeled(list(y), 100, seed=1)
    sel = select_by_f1({1: noise, 2: good}, {1: noise[idx], 2: good[idx]}, y[idx])
    assert sel.params["candidate"] == 2 and sel.params["val_f1"] == 1.0
    assert 1 <= sel.threshold < 10
    assert (sel.removed == y.astype(bool)).all()
    assert sel.rule == "f1" and "threshold" in sel.reason(11.0)


def test_f1_rule_threshold_grid_spans_min_to_max():
    v = np.array([0.0, 1.0, 2.0, 3.0])
    sel = select_by_f1({1: v}, {1: v}, [0, 0, 1, 1], n_thresholds=4)  # grid 0,1,2,3
    assert sel.threshold == 1.0 and sel.removed.tolist() == [False, False, True, True]


def test_f1_rule_needs_a_harmful_label():
    with pytest.raises(ValueError, match="no harmful example"):
        select_by_f1({1: np.arange(3.0)}, {1: np.arange(3.0)}, [0, 0, 0])


def test_draw_labeled_is_reproducible_and_skips_unlabelled():
    labels = [None, 1, 0, None, 1, 0, 0, 1]
    a, b = draw_labeled(labels, 4, seed=3), draw_labeled(labels, 4, seed=3)
    assert (a == b).all() and all(labels[i] is not None for i in a)
    with pytest.raises(ValueError, match="needs 7 labelled samples but the pool has 6"):
        draw_labeled(labels, 7)


def test_fraction_and_threshold_rules():
    s = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    sel = select_fraction(s, fraction=0.4)
    assert sel.removed.tolist() == [False, True, False, True, False]
    assert (s[sel.removed] > sel.threshold).all() and (s[~sel.removed] <= sel.threshold).all()
    assert select_threshold(s, threshold=0.4).removed.tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="fraction must be in"):
        select_fraction(s, fraction=1.5)


def test_detection_metrics():
    m = detection_metrics(np.array([0.9, 0.8, 0.1, 0.2, 0.5]), [1, 1, 0, 0, None],
                          removed=np.array([True, False, False, True, True]))
    assert m["n_labeled"] == 4 and m["auroc"] == 1.0
    assert m["precision"] == 0.5 and m["recall"] == 0.5
    assert m["harmful_fraction_before"] == 0.5 and m["harmful_fraction_after"] == 0.5
    assert detection_metrics(np.zeros(2), [0, 0])["auroc"] is None
