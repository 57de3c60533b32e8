"""Guard v2's family-folded training, the estimate's interval, the distance to the training rows, the families."""

import numpy as np
import pytest

from saft.guard_training import FAMILY_LEVELS, cap_rows, choose_family_level, family_rates, fit_guard, pooled_rates
from saft.trust import (assess, distance_threshold, estimate_interval, nearest_distances, pool_distance,
                        rate_ranges)


def toy_families(seed=0, n=120, d=8):
    """Three families: harmful rows along +e0, safe rows along -e0; family 'odd' has safe rows shifted to +e0."""
    rng = np.random.default_rng(seed)
    X, y, fam = [], [], []
    for f, shift in (("a", 0.0), ("b", 0.0), ("odd", 2.4)):
        for label in (0, 1):
            base = np.zeros(d)
            base[0] = 2.0 if label else -2.0 + shift
            base[1 + len(fam) % (d - 1)] = 0.5
            X.append(base + rng.normal(scale=0.7, size=(n, d)))
            y += [label] * n
            fam += [f] * n
    return np.vstack(X), np.array(y), np.array(fam)


def test_interval_contains_the_point_estimate_and_widens_with_the_rate_spread():
    narrow = {"tpr": [0.3, 0.3], "fpr": [0.01, 0.01]}
    wide = {"tpr": [0.15, 0.45], "fpr": [0.0, 0.08]}
    flagged, n = 0.3 * 0.1 + 0.01, 1000  # 10% harmful under the narrow ranges' own rates
    lo, hi = estimate_interval(flagged, n, narrow)
    point = (flagged - 0.01) / (0.3 - 0.01)
    assert lo < point < hi and hi - lo < 0.1
    wlo, whi = estimate_interval(flagged, n, wide)
    assert wlo <= lo and whi > hi + 0.05
    assert estimate_interval(0.0, 300, wide)[0] == 0.0  # nothing flagged: the lower end is 0
    assert estimate_interval(0.0, 300, wide)[1] > 0  # ... but 0 flagged rows of 300 do not prove 0
    with pytest.raises(ValueError, match="share"):
        estimate_interval(1.5, 10, wide)


def test_assess_flags_distance_and_width_and_advises_labels():
    ranges = {"tpr": [0.2, 0.4], "fpr": [0.0, 0.05]}
    ok = assess(0.1, 0.035, 2000, {"tpr": [0.3, 0.32], "fpr": [0.005, 0.006]}, distance=0.2, threshold=0.3)
    assert not ok["unlike_training"] and not ok["wide"] and ok["advice"] is None
    assert ok["interval"][0] <= 0.1 <= ok["interval"][1] and ok["level"] == 0.9
    bad = assess(0.1, 0.035, 300, ranges, distance=0.5, threshold=0.3)
    assert bad["unlike_training"] and bad["wide"] and "label" in bad["advice"] and "0.500" in bad["advice"]


def test_nearest_distance_and_threshold():
    rng = np.random.default_rng(0)
    R = rng.normal(size=(50, 5))
    assert nearest_distances(R[:3], R) == pytest.approx(np.zeros(3), abs=1e-12)
    near = R[:20] + rng.normal(scale=0.05, size=(20, 5))
    far = -np.abs(rng.normal(size=(20, 5))) * 0 + rng.normal(size=(20, 5)) * 0 + np.eye(5)[np.arange(20) % 5] * -1
    assert pool_distance(near, R) < pool_distance(far + 3.0 * np.array([1, -1, 1, -1, 1]), R)
    t = distance_threshold({"x": near, "y": R[20:40] + rng.normal(scale=0.1, size=(20, 5))}, R, pool_size=10)
    assert set(t["per_family"]) == {"x", "y"} and t["threshold"] == max(t["per_family"].values())


def test_family_rates_and_pooled_rates():
    cv = np.array([-1.0, 2.0, 3.0, 0.5, -2.0, 2.5])
    y = np.array([0, 0, 1, 1, 0, 0])
    fam = np.array(["a", "a", "a", "a", "b", "b"])
    r = family_rates(cv, y, fam, 1.0)
    assert r["a"] == {"fpr": 0.5, "tpr": 0.5, "n_safe": 2, "n_harmful": 2}
    assert r["b"]["tpr"] is None and r["b"]["fpr"] == 0.5
    assert pooled_rates(r) == (0.5, 0.5) and pooled_rates(r, skip="b") == (0.5, 0.5)
    assert pooled_rates(r, skip="a") == (0.5, 0.5)  # no harmful family left: all families'
    assert rate_ranges(r) == {"tpr": [0.5, 0.5], "fpr": [0.5, 0.5]}
    keep = cap_rows(np.array(["a"] * 10 + ["b"] * 3), np.zeros(13), 4)
    assert (keep < 10).sum() == 4 and (keep >= 10).sum() == 3


def test_fit_guard_folds_by_family_and_measures_the_shifted_family():
    X, y, fam = toy_families()
    g = fit_guard(X, y, fam)
    assert g.fold_families == ["a", "b", "odd"] and len(g.folds) == 3
    assert len({f["threshold"] for f in g.folds}) == 1 and g.level in FAMILY_LEVELS
    # the family whose safe rows drift towards harmful crosses the threshold more often, unseen
    assert g.rates["odd"]["fpr"] > g.rates["a"]["fpr"]
    scores = g.score(X)
    assert scores[y == 1].mean() > scores[y == 0].mean()
    # a pool of family 'a' at 20% harmful: the estimate is close, the interval covers it
    rng = np.random.default_rng(1)
    a_safe, a_harm = np.flatnonzero((fam == "a") & (y == 0)), np.flatnonzero((fam == "a") & (y == 1))
    idx = np.r_[rng.choice(a_safe, 96, replace=False), rng.choice(a_harm, 24, replace=False)]
    est = g.estimate(X[idx])
    lo, hi = estimate_interval(float(g.flagged_shares(X[idx]).mean()), len(idx), rate_ranges(g.rates))
    assert abs(est - 0.2) < 0.15 and lo <= 0.2 <= hi
    with pytest.raises(ValueError, match="3 families"):
        fit_guard(X[fam != "odd"], y[fam != "odd"], np.where(fam[fam != "odd"] == "a", "a", "b"))


def test_choose_family_level_takes_the_smallest_worst_family_error():
    X, y, fam = toy_families(seed=2)
    g = fit_guard(X, y, fam)
    level, worst = choose_family_level(g.cv, y, fam)
    assert worst[level] == min(worst.values()) and len(worst) == len(FAMILY_LEVELS)
    by_level = g.estimates_by_level(X[:50])
    assert set(by_level) == {str(lv) for lv in FAMILY_LEVELS} and by_level[str(g.level)] == pytest.approx(g.estimate(X[:50]))


def toy_guard_files(tmp_path, d=768):
    """A guard v2 trained on toy unit vectors of the sentence view's width, written as the script writes it."""
    from saft.guard_training import save_guard

    X, y, fam = toy_families(n=60, d=d)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    g = fit_guard(X, y, fam)
    js, npz = tmp_path / "g.json", tmp_path / "g_rbf.npz"
    save_guard(g, js, npz, meta={"version": 2}, trust={"distance_threshold": 0.3})
    return g, X, y, js


def test_saved_guard_loads_in_guard_scorer_and_gives_the_trust_block(tmp_path):
    from saft import GuardScorer
    from saft.trust import guard_calibration, label_free_trust

    g, X, y, js = toy_guard_files(tmp_path)
    for kernel in ("rbf", "linear"):
        gs = GuardScorer(weights=str(js), kernel=kernel).fit(X)
        assert guard_calibration(gs)["distance_threshold"] == 0.3
        t = label_free_trust(gs, X)
        assert t["interval"][0] <= t["estimate"] <= t["interval"][1] and t["level"] == 0.9
        est = gs.contamination_estimate(X)  # the pipeline passes its estimate: the same block, the flagged share
        shares = [(z > f["threshold"]).mean() for f, z in zip(gs.estimate_models_, gs.fold_decisions(X))]
        combine = np.median if gs.meta_.get("estimate_combine") == "median" else np.mean
        assert est.flagged == pytest.approx(combine(shares)) and label_free_trust(gs, X, est) == t
        assert set(t) >= {"interval", "distance", "distance_threshold", "unlike_training", "wide", "advice"}
    gs = GuardScorer(weights=str(js)).fit(X)
    assert gs.contamination_estimate(X).value == pytest.approx(g.estimate(X), abs=0.02)  # float16 support vectors
    np.testing.assert_allclose(gs.score_samples(X), g.score(X), atol=0.05)
    # far from every training row: the distance says so, and the advice asks for labels
    far = np.abs(np.random.default_rng(5).normal(size=(40, 768)))
    t = label_free_trust(gs, far / np.linalg.norm(far, axis=1, keepdims=True))
    assert t["unlike_training"] and "label" in t["advice"]
    # guard v1 ships no calibration: no trust block rather than an invented one
    assert label_free_trust(GuardScorer().fit(X), X) is None


def test_filter_reports_trust_and_never_removes_above_the_interval(tmp_path):
    import json as _json

    from conftest import toy_rows, write_jsonl
    from saft import FilterConfig, filter_dataset

    _, _, _, js = toy_guard_files(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(30))
    for rule in ("estimate",):
        res = filter_dataset(data, output_dir=tmp_path / rule, config=FilterConfig(
            detector="guard", rule=rule, guard=str(js), cache_dir=str(tmp_path / "c")), progress=False)
        t = res.summary["trust"]
        assert t is not None and res.summary["n_removed"] <= np.floor(t["interval"][1] * 30 + 1e-9)
        assert _json.loads((tmp_path / rule / "summary.json").read_text())["trust"] == t
    res = filter_dataset(data, output_dir=tmp_path / "f", config=FilterConfig(
        detector="guard", rule="fraction", fraction=0.5, guard=str(js), cache_dir=str(tmp_path / "c")), progress=False)
    assert res.summary["trust"] is None and res.summary["n_removed"] == 15  # a rule the user sized is not capped


def test_fit_guard_with_heldout_rows_takes_each_folds_seen_family_rates():
    X, y, fam = toy_families(seed=3)
    Xh, yh, fh = toy_families(seed=4, n=40)
    g = fit_guard(X, y, fam, heldout=(Xh, yh, fh))
    assert {k.rsplit(" ", 1)[1] for k in g.range_rates} == {"seen", "unseen", "assumed"}
    # fold 'a' never saw family a: its rates come from families b and odd only
    from saft.guard_training import family_rates, pooled_rates
    from saft.detectors.guard import decision

    m = fh != "a"
    expected = pooled_rates(family_rates(decision(g.folds[0], Xh[m]), yh[m], fh[m], g.threshold))
    assert (g.folds[0]["tpr"], g.folds[0]["fpr"]) == pytest.approx(expected)
    # the level was chosen by simulating the estimate as shipped: each fold model with its seen rates
    level, worst = choose_family_level(g.cv, g.y, g.families, heldout=g.heldout,
                                       heldout_decisions=[decision(f, g.heldout[0]) for f in g.folds])
    assert (level, worst) == (g.level, g.level_worst_rmse)
    assert worst != choose_family_level(g.cv, g.y, g.families)[1]  # not the family-held-out rates of the others
    lo, hi = rate_ranges(g.range_rates)["tpr"]
    assert lo <= min(f["tpr"] for f in g.folds) and hi >= max(r["tpr"] for r in g.rates.values() if r["tpr"] is not None)
