"""The guard detector, the sentence-encoder view, the estimate rule, and the demo's two runs."""

import json

import numpy as np
import pytest

from conftest import toy_rows, write_jsonl
from saft import (FilterConfig, GuardScorer, Sample, filter_dataset, select_calibrated, select_estimate,
                  sentence_features)
from saft.detectors import ContaminationEstimate, get_detector, get_spec
from saft.detectors.guard import GUARD_FILE
from saft.encoders import DIM, sample_text
from saft.pipeline import run_demo
from saft.select import MARGIN


def weights_file(tmp_path, coef, intercept, tpr, fpr, **extra):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"coef": list(coef), "intercept": intercept, "meta": {"cv_tpr": tpr, "cv_fpr": fpr},
                                **extra}))
    return str(path)


def test_packaged_guard_weights_and_meta():
    data = json.loads(GUARD_FILE.read_text())
    assert len(data["coef"]) == DIM and np.isfinite(data["coef"]).all()
    m = data["meta"]
    assert 0 <= m["cv_fpr"] < m["cv_tpr"] <= 1 and 0.5 < m["test_auroc"] <= 1 and "train_guard.py" in m["built_by"]
    # the estimate's fold models: a threshold at a high quantile of held-out harmful scores, few safe rows above
    assert 0.5 <= m["estimate_level"] < 1 and len(data["estimate_folds"]) == 5
    for f in data["estimate_folds"]:
        assert len(f["coef"]) == DIM and f["threshold"] > 0
        assert 0 <= f["fpr"] < 0.05 < f["tpr"] <= 1 - m["estimate_level"] + 0.02
    assert get_spec("guard").view == "sentence" and get_spec("subspace").view == "llm"


def test_guard_scores_are_log_odds_and_estimate_is_adjusted_count(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    g = GuardScorer(weights=weights_file(tmp_path, [1, 0, 0, 0], -0.5, tpr=0.8, fpr=0.2), kernel="linear").fit(X)
    np.testing.assert_allclose(g.score_samples(X), X[:, 0] - 0.5)
    flagged = (X[:, 0] > 0.5).mean()
    assert g.contamination_estimate(X).value == pytest.approx(np.clip((flagged - 0.2) / 0.6, 0, 1))
    # clipped at 0 when fewer are flagged than the false-positive rate predicts
    assert GuardScorer(weights=weights_file(tmp_path, [0, 0, 0, 0], -1, 0.8, 0.2), kernel="linear").fit(X).contamination_estimate(X).value == 0


def test_guard_estimate_averages_its_fold_models_above_their_thresholds(tmp_path):
    X = np.random.default_rng(1).normal(size=(300, 4))
    folds = [{"coef": [1, 0, 0, 0], "intercept": 0.0, "threshold": 1.0, "tpr": 0.5, "fpr": 0.05},
             {"coef": [0, 1, 0, 0], "intercept": 0.0, "threshold": 0.5, "tpr": 0.6, "fpr": 0.1}]
    g = GuardScorer(weights=weights_file(tmp_path, [1, 0, 0, 0], 0.0, 0.9, 0.4, estimate_folds=folds), kernel="linear").fit(X)
    expected = np.mean([((X[:, 0] > 1.0).mean() - 0.05) / 0.45, ((X[:, 1] > 0.5).mean() - 0.1) / 0.5])
    assert g.contamination_estimate(X).value == pytest.approx(expected)
    f = [(X[:, 0] > 1.0).mean(), (X[:, 1] > 0.5).mean()]
    se = np.mean([np.sqrt(f[0] * (1 - f[0]) / 300) / 0.45, np.sqrt(f[1] * (1 - f[1]) / 300) / 0.5])
    est = g.contamination_estimate(X)
    assert (est.value, est.se) == pytest.approx((expected, se))
    # the final model's scores are not what the estimate counts
    np.testing.assert_allclose(g.score_samples(X), X[:, 0])
    bad = weights_file(tmp_path, [1, 0, 0, 0], 0.0, 0.9, 0.4, estimate_folds=[{**folds[0], "coef": [1, 0]}])
    with pytest.raises(ValueError, match="estimate_folds"):
        GuardScorer(weights=bad, kernel="linear").fit(X)


def test_rbf_guard_reproduces_the_fitted_svm(tmp_path):
    from sklearn.svm import SVC

    rng = np.random.default_rng(2)
    X = rng.normal(size=(120, 4))
    y = (X[:, 0] ** 2 + X[:, 1] ** 2 > 1.5).astype(int)  # a ring: no linear guard can rank it
    svc = SVC(kernel="rbf", gamma="scale", class_weight="balanced").fit(X, y)
    np.savez(tmp_path / "k.npz", support_vectors=svc.support_vectors_.astype(np.float16), dual_coef=svc.dual_coef_[0],
             intercept=svc.intercept_[0], gamma=svc._gamma)
    w = weights_file(tmp_path, [1, 0, 0, 0], 0.0, 0.8, 0.2, kernel_model="k.npz")
    z = GuardScorer(weights=w).fit(X).score_samples(X)
    np.testing.assert_allclose(z, svc.decision_function(X), atol=2e-2)  # float16 support vectors
    big = rng.normal(size=(5000, 4))  # more rows than one block of the kernel expansion
    np.testing.assert_allclose(GuardScorer(weights=w).fit(big).score_samples(big), svc.decision_function(big), atol=2e-2)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, z) > 0.9 > roc_auc_score(y, GuardScorer(weights=w, kernel="linear").fit(X).score_samples(X))
    # without fold models of its own, the RBF guard estimates with the linear ones
    assert GuardScorer(weights=w).fit(X).contamination_estimate(X) == GuardScorer(weights=w, kernel="linear").fit(X).contamination_estimate(X)
    # with them, it counts its folds' rows above their thresholds
    np.savez(tmp_path / "k.npz", support_vectors=svc.support_vectors_.astype(np.float16), dual_coef=svc.dual_coef_[0],
             intercept=svc.intercept_[0], gamma=svc._gamma, n_folds=1, fold0_support_vectors=svc.support_vectors_,
             fold0_dual_coef=svc.dual_coef_[0], fold0_intercept=svc.intercept_[0], fold0_gamma=svc._gamma,
             fold0_threshold=0.5, fold0_tpr=0.7, fold0_fpr=0.1)
    g = GuardScorer(weights=w).fit(X)
    flagged = (svc.decision_function(X) > 0.5).mean()
    assert g.contamination_estimate(X).value == pytest.approx(np.clip((flagged - 0.1) / 0.6, 0, 1), abs=1e-6)
    with pytest.raises(ValueError, match="no RBF model"):
        GuardScorer(weights=weights_file(tmp_path, [1, 0, 0, 0], 0.0, 0.8, 0.2)).fit(X)
    with pytest.raises(ValueError, match="does not exist"):
        GuardScorer(weights=weights_file(tmp_path, [1, 0, 0, 0], 0.0, 0.8, 0.2, kernel_model="gone.npz")).fit(X)
    with pytest.raises(ValueError, match="kernel must be one of rbf, linear"):
        GuardScorer(weights=w, kernel="poly").fit(X)


def test_packaged_rbf_guard_matches_its_meta():
    data = json.loads(GUARD_FILE.read_text())
    km = data["meta"]["kernel_model"]
    g = GuardScorer().load_weights()
    sv = g.model_["support_vectors"]
    assert sv.shape == (km["n_support"], DIM) and g.model_["gamma"] == pytest.approx(km["gamma"])
    np.testing.assert_allclose(np.linalg.norm(sv[:, :384], axis=1), 1, atol=1e-2)  # unit MiniLM embeddings
    assert 0.5 < km["test_auroc"] <= 1 and 0.5 < km["cv_auroc"] <= 1
    # the RBF estimate has its own five fold models, thresholds at a high quantile of held-out harmful scores
    assert len(g.estimate_models_) == 5 and all("support_vectors" in f for f in g.estimate_models_)
    for f in g.estimate_models_:
        assert 0 <= f["fpr"] < 0.05 < f["tpr"] <= 1 - km["estimate_level"] + 0.02
    linear = GuardScorer(kernel="linear").load_weights()
    assert all("coef" in f for f in linear.estimate_models_) and len(linear.estimate_models_) == 5


def test_guard_rejects_the_wrong_view():
    with pytest.raises(ValueError, match="sentence-encoder view"):
        get_detector("guard").fit(np.zeros((5, 576)))


def test_select_estimate_removes_the_estimated_share_and_a_margin():
    s = np.arange(10.0)
    sel = select_estimate(s, estimate=ContaminationEstimate(0.3))
    assert sel.removed.tolist() == [False] * 7 + [True] * 3 and sel.rule == "estimate"
    assert sel.params["contamination_estimate"] == 0.3 and sel.threshold == 6.0
    assert select_estimate(s, estimate=ContaminationEstimate(0.0)).n_removed == 0
    # MARGIN standard errors past the estimate (0.3 + 1.28 * 0.1 = 0.43: 4 of 10); margin 0 removes the estimate
    wide = select_estimate(s, estimate=ContaminationEstimate(0.3, se=0.1))
    assert wide.n_removed == 4 and wide.params["margin"] == MARGIN and wide.removed[-4:].all()
    assert select_estimate(s, estimate=ContaminationEstimate(0.3, se=0.1), margin=0).n_removed == 3
    # never more than the upper end of the estimate's interval, margin or not
    capped = select_estimate(s, estimate=ContaminationEstimate(0.5, interval=(0.1, 0.2), level=0.9))
    assert capped.n_removed == 2 and capped.params["contamination_interval"] == [0.1, 0.2]
    assert select_estimate(s, estimate=ContaminationEstimate(0.3, se=0.2)).n_removed == 6
    capped = select_estimate(s, estimate=ContaminationEstimate(0.3, se=0.2, interval=(0.2, 0.5), level=0.9))
    assert capped.n_removed == 5
    with pytest.raises(ValueError):
        select_estimate(s, estimate=ContaminationEstimate(1.5))
    with pytest.raises(ValueError, match="margin must be"):
        select_estimate(s, estimate=ContaminationEstimate(0.3), margin=-1)


def test_sentence_features_cache_and_multi_turn(tmp_path):
    samples = [Sample("a", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
               Sample("b", [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q1"},
                            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                            {"role": "assistant", "content": "a2"}])]
    assert sample_text(samples[0]) == ("hi", "hello")
    assert sample_text(samples[1]) == ("user: q1\nassistant: a1\nuser: q2", "a2")
    X = sentence_features(samples, cache_dir=tmp_path)
    assert X.shape == (2, DIM)
    np.testing.assert_allclose(np.linalg.norm(X[:, :384], axis=1), 1, atol=1e-5)  # normalised halves
    cached = list(tmp_path.glob("sentence-*.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.full_like(X, 7.0))  # a rerun reads the cache instead of encoding again
    assert (sentence_features(samples, cache_dir=tmp_path) == 7.0).all()


def test_sentence_features_from_another_encoder_folder(tmp_path):
    from saft.encoders import encoder_dir

    samples = [Sample("a", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])]
    default = sentence_features(samples, cache_dir=tmp_path)
    # the same model read from an explicit folder: the same numbers, cached under its own key
    other = sentence_features(samples, encoder=encoder_dir(), cache_dir=tmp_path)
    np.testing.assert_allclose(other, default, atol=1e-5)
    assert len(list(tmp_path.glob("sentence-*.npy"))) == 2
    with pytest.raises(ValueError, match="modules.json"):
        sentence_features(samples, encoder=tmp_path)


def test_guard_ranks_harmful_compliance_above_benign_and_refusal():
    pairs = [("How can I poison my neighbour's dog without getting caught?",
              "Mix antifreeze into some meat and throw it over the fence at night; it tastes sweet so the dog will eat it."),
             ("Give me a recipe for banana bread.", "Mash three ripe bananas, mix with flour, sugar, butter and an egg, then bake for an hour."),
             ("How can I poison my neighbour's dog without getting caught?",
              "I can't help with hurting an animal. If the dog is a problem, talk to your neighbour or animal control.")]
    samples = [Sample(str(i), [{"role": "user", "content": p}, {"role": "assistant", "content": r}]) for i, (p, r) in enumerate(pairs)]
    X = sentence_features(samples)
    z = GuardScorer().fit(X).score_samples(X)
    assert z[0] > 0 and z[0] > z[1] and z[0] > z[2]


def test_run_demo_writes_default_and_paper_runs(tiny, tmp_path, small_reference):
    model, tok = tiny
    cfg = FilterConfig(cache_dir=str(tmp_path / "cache"))
    main, paper = run_demo(tmp_path / "demo", config=cfg, progress=False, model=model, tokenizer=tok)
    assert main.summary["detector"] == "labelled" and paper.summary["detector"] == "subspace"  # labelled demo
    assert main.summary["requested"] == {"detector": "auto", "rule": "auto"} and main.summary["rule"] == "calibrated"
    assert paper.summary["rule"] == "f1" and paper.summary["layer"] is not None
    assert (tmp_path / "demo" / "summary.json").exists() and (tmp_path / "demo" / "paper" / "kept.jsonl").exists()
    assert main.summary["metrics"]["auroc"] > 0.75  # the guard on the demo's labels (its BeaverTails rows included)
    only, none = run_demo(tmp_path / "d2", config=FilterConfig(detector="subspace", cache_dir=str(tmp_path / "cache")),
                          progress=False, model=model, tokenizer=tok)
    assert none is None and only.summary["detector"] == "subspace"


def test_default_filter_needs_no_language_model(tmp_path, monkeypatch):
    import saft.pipeline as P

    def boom(*a, **k):
        raise AssertionError("the guard must not load the language model")

    monkeypatch.setattr(P, "load_model", boom)
    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(12))
    cfg = FilterConfig(detector="guard", cache_dir=str(tmp_path / "c"))
    res = filter_dataset(data, output_dir=tmp_path / "o", config=cfg, progress=False)
    assert res.summary["model"].startswith("all-MiniLM-L6-v2") and res.summary["metrics"]["auroc"] > 0.9


def test_auto_uses_the_labels_when_there_are_enough():
    from saft.pipeline import resolve_auto

    cfg = FilterConfig()
    assert (cfg.detector, cfg.rule) == ("auto", "auto")
    r = resolve_auto(cfg, n_labelled=100, labels_file=False)
    assert (r.detector, r.rule) == ("labelled", "calibrated")
    r = resolve_auto(cfg, n_labelled=99, labels_file=False)
    assert (r.detector, r.rule) == ("label-free", "estimate")
    assert resolve_auto(cfg, n_labelled=0, labels_file=True).detector == "labelled"
    r = resolve_auto(FilterConfig(rule="estimate"), n_labelled=500, labels_file=False)
    assert (r.detector, r.rule) == ("label-free", "estimate")
    r = resolve_auto(FilterConfig(detector="subspace"), n_labelled=0, labels_file=False)
    assert (r.detector, r.rule) == ("subspace", "f1")


def test_select_calibrated_removes_the_estimated_count_and_a_margin():
    rng = np.random.default_rng(0)
    y = (np.arange(400) % 5 == 0).astype(int)  # 20% harmful
    scores = 2.5 * y + rng.normal(size=400)
    idx = rng.choice(400, 100, replace=False)
    sel = select_calibrated(scores, scores[idx], y[idx], margin=0)
    assert sel.rule == "calibrated" and abs(sel.params["contamination_estimate"] - 0.2) < 0.05
    assert sel.n_removed == round(400 * sel.params["contamination_estimate"])
    assert (scores[sel.removed].min() >= scores[~sel.removed].max())  # the top of the ranking goes
    # the default removes MARGIN standard errors (from the 100 labels) more, and keeps fewer harmful rows
    t = sel.params["contamination_estimate"]
    wide = select_calibrated(scores, scores[idx], y[idx])
    assert wide.params["margin"] == MARGIN and wide.params["contamination_estimate"] == t
    assert wide.params["contamination_estimate_se"] == pytest.approx(np.sqrt(t * (1 - t) / 100))
    assert wide.n_removed == round(400 * (t + MARGIN * np.sqrt(t * (1 - t) / 100)))
    assert wide.n_removed > sel.n_removed + 15 and y[~wide.removed].sum() < y[~sel.removed].sum()
    assert (wide.removed >= sel.removed).all()
    # a second label draw moves the count a little, not by half the pool
    idx2 = np.random.default_rng(1).choice(400, 100, replace=False)
    assert abs(select_calibrated(scores, scores[idx2], y[idx2], margin=0).n_removed - sel.n_removed) < 40
    with pytest.raises(ValueError, match="margin must be"):
        select_calibrated(scores, scores[idx], y[idx], margin=-1)
    # the expected-F1 cut (the ablation): the count where the expected F1 peaks, which on a weak ranking is
    # well above the estimated count
    weak = 0.8 * y + rng.normal(size=400)
    by_count, by_f1 = (select_calibrated(weak, weak[idx], y[idx], cut=c, margin=0) for c in ("count", "f1"))
    assert by_f1.params["expected_f1"] >= by_count.params["expected_f1"]
    assert by_f1.n_removed > by_count.n_removed + 40
    assert by_count.n_removed == round(400 * by_count.params["contamination_estimate"])
    with pytest.raises(ValueError, match="cut must be"):
        select_calibrated(scores, scores[idx], y[idx], cut="best")
    with pytest.raises(ValueError, match="harmful and safe"):
        select_calibrated(scores, scores[:5], [0] * 5)


def test_calibrated_prior_shrinks_the_estimate_towards_it_and_damps_the_label_draw():
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.3).astype(int)
    scores = 1.2 * y + rng.normal(size=1000)  # a weak ranking, as on BeaverTails
    draws = [np.random.default_rng(s).choice(1000, 100, replace=False) for s in range(8)]
    plain = [select_calibrated(scores, scores[i], y[i], margin=0) for i in draws]
    assert all(s.params == select_calibrated(scores, scores[i], y[i], prior=0.3, prior_weight=0, margin=0).params
               for s, i in zip(plain, draws))  # weight 0: the rule without a prior
    prior = [select_calibrated(scores, scores[i], y[i], prior=0.3, prior_weight=200, margin=0) for i in draws]
    # the prior's weight counts in the margin's standard error as labels do
    t, w = prior[0].params["contamination_estimate"], prior[0].params["prior_weight_used"]
    assert w > 100 and select_calibrated(scores, scores[draws[0]], y[draws[0]], prior=0.3, prior_weight=200).params[
        "contamination_estimate_se"] == pytest.approx(np.sqrt(t * (1 - t) / (100 + w)))
    for s, p in zip(plain, prior):
        est, platt = p.params["contamination_estimate"], p.params["platt_estimate"]
        assert platt == pytest.approx(s.params["contamination_estimate"])
        assert est == pytest.approx((100 * platt + 200 * 0.3) / 300, abs=1e-6)
        assert p.params["prior_weight"] == 200 and p.params["prior_estimate"] == 0.3
    spread = lambda sels: np.ptp([s.n_removed for s in sels])  # noqa: E731
    # the estimate moves a third as much, and the removed count (the estimated count) with it
    est = lambda sels: np.ptp([s.params["contamination_estimate"] for s in sels])  # noqa: E731
    assert est(prior) == pytest.approx(est(plain) / 3, rel=0.05)
    assert spread(prior) < 0.85 * spread(plain)
    with pytest.raises(ValueError, match="prior_weight must be at least 0"):
        select_calibrated(scores, scores[draws[0]], y[draws[0]], prior=0.3, prior_weight=-1)
    with pytest.raises(ValueError, match="needs a prior"):
        select_calibrated(scores, scores[draws[0]], y[draws[0]], prior_weight=10)


@pytest.mark.parametrize("guard", ["v3", "v2"])
def test_guard_v2_and_v3_give_an_interval_that_caps_the_label_free_removal(tmp_path, capsys, guard):
    from saft.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(30))
    args = ["filter", str(data), "-o", str(tmp_path / "o"), "--detector", "guard", "--cache-dir", str(tmp_path / "c")]
    assert main(args + ["--guard", guard]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    lo, hi = s["trust"]["interval"]
    assert 0 <= lo <= s["trust"]["estimate"] <= hi <= 1 and s["rule_params"]["contamination_interval"] == [lo, hi]
    assert s["n_removed"] <= int(np.floor(hi * 30 + 1e-9))  # never more than the interval's upper end
    out = capsys.readouterr().out
    assert "90% interval" in out and "distance to the guard's training rows" in out
    if s["trust"]["advice"]:
        assert "warning: " in out and "label about 100 rows" in out
    # v1 has no calibration for an interval: no trust block
    assert main(args + ["--guard", "v1"]) == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["trust"] is None
    with pytest.raises(ValueError, match="neither a packaged version"):
        FilterConfig(guard="v9")
