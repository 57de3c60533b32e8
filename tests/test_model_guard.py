"""label-free: the guard's recipe trained on the guard's rows in the model's view, plus a student on the pool."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import saft.reference as R
from conftest import toy_rows, write_jsonl
from test_guard import weights_file
from saft import FilterConfig, extract_features, filter_dataset
from saft.detectors import detector_positions, get_detector, get_spec
from saft.encoders import ENCODER_VERSION, sentence_cache_path
from saft.features import feature_manifest
from saft.select import MARGIN


def view(rng, n, *, harmful_every=4, shift=0.0):
    """The "both" layout with a 1-column guard view and two 3-column hidden blocks. Harmful rows differ along
    the first column of each block (more in the second, the response); the guard's column sees them only
    through noise."""
    y = (np.arange(n) % harmful_every == 0).astype(int)
    S = (0.5 * y + rng.normal(size=n))[:, None]
    H1, H2 = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    H1[:, 0] += 2.0 * y
    H2[:, 0] += 3.0 * y
    H1[:, 1] += shift  # a pool can differ from the reference rows in ways unrelated to harm
    return y, np.hstack([S, H1, H2])


def test_guard_model_learns_from_the_reference_rows(tmp_path):
    rng = np.random.default_rng(0)
    y_ref, X_ref = view(rng, 400, harmful_every=3)
    y, X = view(rng, 300, shift=2.0)
    w = weights_file(tmp_path, [1.0], -1.0, 0.8, 0.2)
    det = get_detector("label-free", weights=w, kernel="linear", n_components=2)
    assert det.fit(X, reference_X=X_ref, reference_y=y_ref) is det
    guard = get_detector("guard", weights=w, kernel="linear").fit(X[:, :1])
    assert roc_auc_score(y, det.score_samples(X)) > 0.9 > 0.7 > roc_auc_score(y, guard.score_samples(X[:, :1]))
    # the student's harmful pseudo-labels are sized by the packaged guard's estimate, reported unchanged
    est = guard.contamination_estimate(X[:, :1])
    assert det.contamination_estimate(X) == est
    assert (det.pseudo_labels_ == 1).sum() == max(round(est.value * len(X)), 10) and (det.pseudo_labels_ == 0).sum() == 150
    # the student reads the first position's block only (3 columns), the classifier every column
    assert det.components_.n_features_in_ == 3 and det.classifier_.n_features_in_ == 7
    spec = get_spec("label-free")
    assert (spec.view, spec.rule, spec.reference, spec.labels) == ("both", "estimate", True, False)
    assert not get_spec("guard").reference


def test_guard_model_explains_bad_input(tmp_path):
    rng = np.random.default_rng(1)
    y_ref, X_ref = view(rng, 60)
    y, X = view(rng, 40)
    w = weights_file(tmp_path, [1.0], 0.0, 0.8, 0.2)
    det = get_detector("label-free", weights=w, kernel="linear", n_components=2)
    with pytest.raises(ValueError, match="pass reference_X and reference_y"):
        det.fit(X)
    with pytest.raises(ValueError, match="the guard's rows have 6 columns but the pool has 7"):
        det.fit(X, reference_X=X_ref[:, :6], reference_y=y_ref)
    with pytest.raises(ValueError, match="both classes"):
        det.fit(X, reference_X=X_ref, reference_y=np.zeros(len(y_ref)))
    with pytest.raises(ValueError, match=r"hidden states at 2 positions \(prompt_last, response_mean\); got 6 columns"):
        det.fit(X[:, :6], reference_X=X_ref[:, :6], reference_y=y_ref)
    with pytest.raises(ValueError, match="at least 2 rows"):
        det.fit(X[:1], reference_X=X_ref, reference_y=y_ref)
    for bad in ({"safe_share": 0.0}, {"C": 0.0}, {"student_C": -1.0}):
        with pytest.raises(ValueError):
            get_detector("label-free", weights=w, kernel="linear", **bad).fit(X, reference_X=X_ref, reference_y=y_ref)
    # one position: the student reads the only block
    one = get_detector("label-free", weights=w, kernel="linear", positions=("last",), n_components=2)
    assert one.fit(X[:, :4], reference_X=X_ref[:, :4], reference_y=y_ref).components_.n_features_in_ == 3


def test_detector_positions_put_the_configured_one_first():
    assert detector_positions("label-free", "prompt_last") == ["prompt_last", "response_mean"]
    assert detector_positions("label-free", "response_mean") == ["response_mean", "prompt_last"]
    assert detector_positions("label-free", "last") == ["last", "prompt_last", "response_mean"]
    assert detector_positions("guard", "last") == ["last"]
    with pytest.raises(ValueError, match="no longer available; use 'label-free'"):
        get_spec("guard-model")


def test_shipped_guard_rows():
    samples = R.reference_samples()
    assert len(samples) == 2306 and sum(s.label for s in samples) == 718
    sources = {s.meta["source"] for s in samples}
    assert sources == {"bt_safe", "bt_unsafe", "refusal_llama2"}
    assert all(s.label == 0 for s in samples if s.meta["source"] != "bt_unsafe")
    with np.load(R.SHIPPED_FILE) as z:
        meta = json.loads(str(z["meta"]))
        assert z["sentence"].shape == (2306, 768) and z["hidden"].shape == (2306, 2, 1, 576)
    assert meta["manifest"]["positions"] == ["prompt_last", "response_mean"] and meta["manifest"]["layers"] == [15]
    assert meta["manifest"]["n_samples"] == 2306 and meta["manifest"]["max_length"] == 512


def test_shipped_guard_rows_are_the_guard_training_rows():
    from saft.pools import default_raw_dir, guard_training_rows

    try:
        raw = default_raw_dir()
    except FileNotFoundError:
        pytest.skip("shared/data/raw is not here")
    rows = guard_training_rows(raw)
    samples = R.reference_samples()
    assert [(s.prompt, s.response, s.label) for s in samples] == [(r["prompt"], r["response"], r["harmful"]) for r in rows]


def test_shipped_views_are_placed_only_for_their_manifest(tiny, tmp_path):
    model, tok = tiny
    samples = R.reference_samples()[::50]
    cache = tmp_path / "features"
    shipped = tmp_path / "shipped.npz"
    manifest = feature_manifest(model, tok, samples, layers=[2], positions=["prompt_last", "response_mean"],
                                max_length=64)
    hidden = np.random.default_rng(0).normal(size=(len(samples), 2, 1, 32)).astype(np.float16)
    sentence = np.random.default_rng(1).normal(size=(len(samples), 768)).astype(np.float16)
    meta = {"encoder": ENCODER_VERSION, "sentence_file": sentence_cache_path(samples, ".").name, "manifest": manifest}
    np.savez_compressed(shipped, meta=json.dumps(meta), sentence=sentence, hidden=hidden)
    kw = dict(layer=2, max_length=64, cache_dir=cache, shipped=shipped)
    # another setting: the sentence view (model-free) is placed, the hidden states are not
    assert not R.place_shipped_views(model, tok, samples, positions=["prompt_last", "last"], **kw)
    np.testing.assert_array_equal(np.load(sentence_cache_path(samples, cache)), sentence.astype(np.float32))
    # other rows: nothing is placed for them
    other = tmp_path / "other"
    assert not R.place_shipped_views(model, tok, samples[1:], positions=["prompt_last", "response_mean"], layer=2,
                                     max_length=64, cache_dir=other, shipped=shipped)
    assert not other.exists() or not any(other.iterdir())
    assert not (cache / "rows-v2").exists()
    assert R.place_shipped_views(model, tok, samples, positions=["prompt_last", "response_mean"], **kw)
    feats = extract_features(model, tok, samples, layers=[2], positions=["prompt_last", "response_mean"],
                             max_length=64, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(feats.get(2, "response_mean"), hidden[:, 1, 0].astype(np.float32))


def test_filter_with_guard_model(tiny_model_dir, tmp_path, monkeypatch, small_reference):
    from saft import load_model

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    data = write_jsonl(tmp_path / "data.jsonl", toy_rows(30))
    cfg = FilterConfig(detector="label-free", cache_dir=str(tmp_path / "c"), layer=2)
    res = filter_dataset(data, output_dir=tmp_path / "out", config=cfg, model=model, tokenizer=tok, progress=False)
    s = res.summary
    assert (s["detector"], s["rule"], s["positions"]) == ("label-free", "estimate", ["prompt_last", "response_mean"])
    # the estimate and MARGIN of its standard errors more, never past the interval's upper end
    p = s["rule_params"]
    share = p["contamination_estimate"] + MARGIN * p["contamination_estimate_se"]
    if "contamination_interval" in p:
        share = min(share, p["contamination_interval"][1])
    assert p["margin"] == MARGIN and s["n_removed"] == round(share * 30)
    # the guard's rows' features are cached: a second run computes no hidden states at all
    monkeypatch.setattr("saft.features._forward_batch", lambda *a, **k: pytest.fail("computed features again"))
    again = filter_dataset(data, config=cfg, model=model, tokenizer=tok, progress=False)
    np.testing.assert_allclose(again.scores, res.scores)


def test_label_free_on_a_streamed_file_reads_its_view_in_chunks(tiny_model_dir, tmp_path, monkeypatch,
                                                               small_reference):
    """A streamed JSONL is read a block at a time for the hidden states (its samples never held as one list), and
    a view over VIEW_IN_MEMORY_BYTES reaches the detector as a chunked HStack over the store and the sentence
    view's file: the scores and the removal are the in-memory view's."""
    import saft.pipeline as P
    from saft import load_model
    from saft.chunks import HStack
    from saft.data import StreamedDataset

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    data = write_jsonl(tmp_path / "data.jsonl", toy_rows(30))
    cfg = FilterConfig(detector="label-free", cache_dir=str(tmp_path / "c"), layer=2)
    in_memory = filter_dataset(data, config=cfg, model=model, tokenizer=tok, progress=False)
    monkeypatch.setattr(StreamedDataset, "_load", lambda self: pytest.fail("read the whole file into a list"))
    views = []
    score_and_select = P.score_and_select
    monkeypatch.setattr(P, "score_and_select", lambda config, X, **kw: views.append(X) or score_and_select(config, X, **kw))
    monkeypatch.setattr(P, "VIEW_IN_MEMORY_BYTES", 0)
    chunked = filter_dataset(data, config=cfg, model=model, tokenizer=tok, progress=False)
    assert isinstance(views[0], HStack) and views[0].shape[0] == 30
    np.testing.assert_allclose(chunked.scores, in_memory.scores, atol=1e-5)
    assert chunked.selection.n_removed == in_memory.selection.n_removed


def test_guard_model_probe_weighs_guard_models_parts_with_labels(tmp_path):
    rng = np.random.default_rng(2)
    y_ref, X_ref = view(rng, 400, harmful_every=3)
    y, X = view(rng, 300, shift=2.0)
    w = weights_file(tmp_path, [1.0], -1.0, 0.8, 0.2)
    semi = np.full(len(y), -1)
    semi[:60] = y[:60]
    det = get_detector("labelled", weights=w, kernel="linear", n_components=2)
    assert det.fit(X, semi, reference_X=X_ref, reference_y=y_ref) is det
    assert roc_auc_score(y, det.score_samples(X)) > 0.9
    # two guide inputs beside the 2 components of the first block: label-free's classifier and its student
    assert det.n_guides_ == 2 and det.probe_.coef_.shape == (1, 4) and det.pca_.n_features_in_ == 3
    guide = get_detector("label-free", weights=w, kernel="linear").fit(X, reference_X=X_ref, reference_y=y_ref)
    parts = guide.part_scores(X)
    assert np.allclose(det.guide_.part_scores(X)[0], parts[0]) and np.allclose(det.guide_.part_scores(X)[1], parts[1])
    # the calibrated rule's prior is label-free's estimate, i.e. the packaged guard's
    assert det.contamination_estimate(X) == guide.contamination_estimate(X)
    spec = get_spec("labelled")
    assert (spec.rule, spec.reference, spec.labels) == ("calibrated", True, True)
    assert detector_positions("labelled", "response_mean") == ["response_mean", "prompt_last"]
    with pytest.raises(ValueError, match="labelled detector needs labels"):
        det.fit(X, reference_X=X_ref, reference_y=y_ref)
    with pytest.raises(ValueError, match="pass reference_X and reference_y"):
        det.fit(X, semi)
    with pytest.raises(ValueError, match="guard_weight must be positive"):
        get_detector("labelled", guard_weight=0.0).fit(X, semi, reference_X=X_ref, reference_y=y_ref)


def test_guard_model_probe_guard_weight_is_a_prior_towards_guard_model(tmp_path):
    # The hidden blocks carry the harm signal through the reference rows only (label-free); with few, noisy labels
    # a larger guard_weight keeps the score closer to label-free's classifier.
    rng = np.random.default_rng(4)
    y_ref, X_ref = view(rng, 400, harmful_every=3)
    y, X = view(rng, 300)
    semi = np.full(len(y), -1)
    semi[:20] = rng.permutation(y[:20])  # labels that carry no information
    w = weights_file(tmp_path, [1.0], -1.0, 0.8, 0.2)
    fit = lambda gw: get_detector("labelled", weights=w, kernel="linear", n_components=2,  # noqa: E731
                                  guard_weight=gw).fit(X, semi, reference_X=X_ref, reference_y=y_ref)
    aucs = {gw: roc_auc_score(y, fit(gw).score_samples(X)) for gw in (0.1, 10.0)}
    assert aucs[10.0] > 0.9 and aucs[10.0] > aucs[0.1]
