"""The region-wise adjusted count (saft.regions) and guard v3, which carries it."""

import json

import numpy as np
import pytest

from saft.regions import (REFUSAL, RegionModel, fit_regions, is_refusal_text, refusal_mask, region_estimate,
                          region_rates)


def test_region_estimate_adjusts_each_region_with_its_own_rates():
    # 100 task rows (fpr 0, tpr 0.8) of which 10 harmful, 8 of them flagged; 100 risky-answer rows (fpr 0.2,
    # tpr 0.7), all safe, 20 flagged: the truth is 10 harmful of 200
    regions = np.array(["task"] * 100 + ["risky"] * 100, dtype=object)
    flagged = np.zeros(200, dtype=bool)
    flagged[:8] = True
    flagged[100:120] = True
    rates = {"task": [0.8, 0.0], "risky": [0.7, 0.2]}
    assert region_estimate(flagged, regions, rates, fallback=(0.75, 0.1)) == pytest.approx(0.05)
    # one pair of rates for every row (the pooled count) misses it: (28/200 - 0.1) / (0.75 - 0.1)
    pooled = region_estimate(flagged, np.array(["all"] * 200, dtype=object), {}, fallback=(0.75, 0.1))
    assert pooled == pytest.approx((0.14 - 0.1) / 0.65) and abs(pooled - 0.05) > 0.01
    with pytest.raises(ValueError, match="empty pool"):
        region_estimate(np.zeros(0, dtype=bool), np.zeros(0, dtype=object), rates, fallback=(0.75, 0.1))


def test_a_region_whose_rates_cannot_separate_takes_the_fallback_pair():
    regions = np.array(["odd"] * 10, dtype=object)
    flagged = np.r_[np.ones(3, bool), np.zeros(7, bool)]
    est, se = region_estimate(flagged, regions, {"odd": [0.2, 0.3]}, fallback=(0.8, 0.1), with_se=True)
    assert est == pytest.approx((0.3 - 0.1) / 0.7) and se == pytest.approx(np.sqrt(10 * 0.21) / 0.7 / 10)
    # neither pair separates: the raw flagged share
    assert region_estimate(flagged, regions, {"odd": [0.2, 0.3]}, fallback=(0.1, 0.1)) == pytest.approx(0.3)


def test_region_rates_take_the_fallback_where_a_region_has_too_few_rows():
    y = np.array([0] * 40 + [1] * 40 + [0] * 5)
    regions = np.array(["a"] * 80 + ["b"] * 5, dtype=object)
    flagged = np.r_[np.zeros(36, bool), np.ones(4, bool), np.ones(30, bool), np.zeros(10, bool), np.ones(5, bool)]
    rates = region_rates(flagged, y, regions, fallback=(0.6, 0.05), min_rows=30)
    assert rates["a"] == pytest.approx([0.75, 0.1])
    assert rates["b"] == [0.6, 0.05]  # no harmful row, 5 safe rows: both rates fall back


def test_region_model_assigns_families_sets_refusals_apart_and_round_trips():
    rng = np.random.default_rng(0)
    centres = {"bt": [3, 0, 0], "task": [0, 3, 0], "jbb": [0, 0, 3]}
    X = np.vstack([rng.normal(c, 0.5, size=(50, 3)) for c in centres.values()])
    fam = np.repeat(list(centres), 50)
    model = fit_regions(X, fam)
    assert (model.assign(X) == fam).mean() > 0.95
    refusal = np.zeros(150, dtype=bool)
    refusal[[0, 60]] = True
    got = model.assign(X, refusal)
    assert got[0] == got[60] == REFUSAL and (got[~refusal] == fam[~refusal]).mean() > 0.95
    again = RegionModel.from_json(json.loads(json.dumps(model.to_json())))
    assert (again.assign(X) == model.assign(X)).all()
    with pytest.raises(ValueError, match="refusal mask has 3 entries for 150 rows"):
        model.assign(X, np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="rebuild the guard file"):
        RegionModel.from_json({**model.to_json(), "classes": ["bt", "task"]})
    two = fit_regions(X[:100], fam[:100])  # two families: both sides spelled out
    assert two.coef.shape == (2, 3) and (two.assign(X[:100]) == fam[:100]).mean() > 0.95


def test_refusals_are_read_from_the_response():
    assert is_refusal_text("I'm sorry, but I can't help with that.")
    assert is_refusal_text("As an AI, I will not do this")
    assert not is_refusal_text("To kill a Python process, run kill -9 PID.")
    assert refusal_mask(r for r in ["I cannot do that", "Sure: here it is"]).tolist() == [True, False]


def test_guard_v3_built_from_a_v2_file_counts_region_by_region(tmp_path):
    from test_trust import toy_families

    from saft import GuardScorer
    from saft.guard_training import FAMILY_LEVELS, fit_guard, save_guard, save_region_guard

    X, y, fam = toy_families(n=60, d=768)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    Xh, yh, fh = toy_families(seed=4, n=40, d=768)
    Xh = Xh / np.linalg.norm(Xh, axis=1, keepdims=True)
    refusal = (fh == "a") & (yh == 0)  # 40 held-out rows read as refusals: a region of their own
    g = fit_guard(X, y, fam, heldout=(Xh, yh, fh), heldout_refusal=refusal)
    v2, v3 = tmp_path / "g.json", tmp_path / "g3.json"
    save_guard(g, v2, tmp_path / "g_rbf.npz", meta={"version": 2}, trust={"distance_threshold": 0.3})
    save_region_guard(v2, v3, X, fam, (Xh, yh, fh), refusal, meta={"version": 3})
    meta = json.loads(v3.read_text())["meta"]
    assert meta["version"] == 3 and meta["based_on"] == "g.json" and "regions" in meta["kernel_model"]
    # a pool of family a's rows, a quarter harmful: v3 is the region-wise count of the same fold models, v2 the
    # pooled one, and the two differ
    pool = np.r_[np.flatnonzero((fh == "a") & (yh == 0))[:30], np.flatnonzero((fh == "a") & (yh == 1))[:10]]
    gs3, gs2 = GuardScorer(weights=str(v3)).fit(X), GuardScorer(weights=str(v2)).fit(X)
    region, pooled = g.estimate(Xh[pool]), g.estimate(Xh[pool], pooled=True)
    assert region > 0 and abs(region - pooled) > 0.02
    # the region-wise count at every level: at the guard's own level it is the estimate, refusals included
    by_level = g.estimates_by_level(Xh[pool], pooled=False)
    assert by_level[str(g.level)] == pytest.approx(region) and len(set(by_level.values())) > 1
    ones = np.ones(len(pool), dtype=bool)
    assert g.estimates_by_level(Xh[pool], refusal=ones, pooled=False)[str(g.level)] == pytest.approx(g.estimate(Xh[pool], ones))
    assert g.estimates_by_level(Xh[pool])[str(g.level)] == pytest.approx(pooled)
    # at another level it is the estimate of the same guard fitted with that level as its only choice
    other = next(lv for lv in FAMILY_LEVELS if lv != g.level)
    g_other = fit_guard(X, y, fam, heldout=(Xh, yh, fh), heldout_refusal=refusal, levels=(other,))
    assert by_level[str(other)] == pytest.approx(g_other.estimate(Xh[pool]))
    with pytest.raises(ValueError, match="no regions"):
        fit_guard(X, y, fam).estimates_by_level(Xh[pool], pooled=False)
    assert gs3.contamination_estimate(Xh[pool]).value == pytest.approx(region, abs=0.01)
    assert gs2.contamination_estimate(Xh[pool]).value == pytest.approx(pooled, abs=0.01)
    # with its standard error, as the packaged guard reports it (the mean of the fold models' binomial errors)
    for kw, gs, value in (({}, gs3, region), ({"pooled": True}, gs2, pooled)):
        v, se = g.estimate(Xh[pool], with_se=True, **kw)
        assert v == value and se > 0 and se == pytest.approx(gs.contamination_estimate(Xh[pool]).se, rel=0.05)
    np.testing.assert_allclose(gs3.score_samples(Xh), gs2.score_samples(Xh))  # the same models score
    # refusals are their own region: a pool of refusals is counted with the refusal region's rates alone
    assert all(REFUSAL in r for r in gs3.region_rates_)
    all_refusals = gs3.contamination_estimate(Xh[pool], refusal=np.ones(len(pool), dtype=bool)).value
    expected = np.median([np.clip(((z > f["threshold"]).mean() - r[REFUSAL][1]) / (r[REFUSAL][0] - r[REFUSAL][1]), 0, 1)
                          for f, z, r in zip(gs3.estimate_models_, gs3.fold_decisions(Xh[pool]), gs3.region_rates_)])
    assert all_refusals == pytest.approx(expected) and expected > 0
    assert all_refusals != pytest.approx(gs3.contamination_estimate(Xh[pool]).value, abs=0.005)
    with pytest.raises(ValueError, match="beside"):
        save_region_guard(v2, tmp_path / "sub" / "g3.json", X, fam, (Xh, yh, fh), refusal, meta={})


def test_packaged_guard_v3_is_v2_with_regions():
    from saft import GuardScorer
    from saft.detectors.guard import GUARDS
    from saft.pools import FAMILIES

    for kernel in ("rbf", "linear"):
        v3 = GuardScorer(weights=str(GUARDS["v3"]), kernel=kernel).load_weights()
        v2 = GuardScorer(weights=str(GUARDS["v2"]), kernel=kernel).load_weights()
        assert sorted(v3.regions_.classes) == sorted(FAMILIES)
        assert len(v3.region_rates_) == len(v3.estimate_models_) == len(v2.estimate_models_)
        assert all(REFUSAL in r for r in v3.region_rates_) and v2.regions_ is None
        x = np.random.default_rng(0).normal(size=(5, 768))
        np.testing.assert_allclose(v3.fit(x).score_samples(x), v2.fit(x).score_samples(x))


def test_filter_hands_the_pools_refusals_to_the_guards_estimate(tmp_path, monkeypatch):
    from conftest import toy_rows, write_jsonl

    from saft import FilterConfig, filter_dataset
    from saft.detectors.guard import GUARDS, GuardScorer

    rows = toy_rows(12)
    for r in rows[1::4]:
        r["response"] = "I'm sorry, but I cannot help with that."
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    seen = []
    original = GuardScorer.contamination_estimate

    def spy(self, X, *, refusal=None):
        seen.append(None if refusal is None else refusal.tolist())
        return original(self, X, refusal=refusal)

    monkeypatch.setattr(GuardScorer, "contamination_estimate", spy)
    res = filter_dataset(data, output_dir=tmp_path / "o", config=FilterConfig(detector="guard", cache_dir=str(tmp_path / "c")),
                         progress=False)
    assert res.summary["trust"] is not None and FilterConfig().guard == "v3" and GUARDS["v3"].exists()
    assert seen and seen[0] == [i % 4 == 1 for i in range(12)]
