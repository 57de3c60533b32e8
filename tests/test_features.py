import numpy as np
import pytest
import torch

import saft.features as F
from conftest import make_model, make_tokenizer
from saft.data import Sample
from saft.render import encode


def samples(n=7):
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": "question " + "x" * (i * 3)}, {"role": "assistant", "content": "answer " * (i % 3 + 1)}]
        if i % 2:
            msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "earlier"},
                    {"role": "assistant", "content": "reply"}] + msgs
        out.append(Sample(id=str(i), messages=msgs))
    return out


@pytest.fixture(scope="module")
def model_tok():
    tok = make_tokenizer()
    return make_model(len(tok), n_layers=4), tok


def reference(model, tok, sample, max_length):
    """Plain full forward pass of one sample with every hidden state."""
    e = encode(sample, tok, max_length=max_length)
    with torch.no_grad():
        hs = model(torch.tensor([e.ids]), output_hidden_states=True).hidden_states
    return e, [h[0].numpy() for h in hs]


@pytest.mark.parametrize("max_length", [512, 24])
def test_every_layer_and_position_matches_a_full_forward_pass(model_tok, max_length):
    model, tok = model_tok
    data = samples()
    feats = F.extract_features(model, tok, data, layers="all", positions=list(F.POSITIONS), max_length=max_length,
                               batch_size=3, progress=False)
    assert feats.layers == [0, 1, 2, 3, 4] and feats.values.shape == (7, 3, 5, 32)
    if max_length == 24:
        assert feats.n_truncated > 0
    for i, s in enumerate(data):
        e, hs = reference(model, tok, s, max_length)
        for layer in feats.layers:
            h = hs[layer]
            np.testing.assert_allclose(feats.get(layer, "prompt_last")[i], h[e.prompt_len - 1], atol=1e-4)
            np.testing.assert_allclose(feats.get(layer, "last")[i], h[-1], atol=1e-4)
            np.testing.assert_allclose(feats.get(layer, "response_mean")[i], h[e.prompt_len:].mean(0), atol=1e-4)


def test_forward_stops_after_the_deepest_layer(model_tok):
    model, tok = model_tok
    blocks = F._decoder_blocks(model, 4)
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, j=j: calls.append(j)) for j, b in enumerate(blocks)]
    head_calls = []
    hooks.append(model.lm_head.register_forward_hook(lambda *a: head_calls.append(1)))
    try:
        F.extract_features(model, tok, samples(4), layers=[2], batch_size=4, progress=False)
    finally:
        for h in hooks:
            h.remove()
    # hidden_states[2] is the input of block 2: blocks 0 and 1 run, nothing after, never the LM head.
    assert sorted(set(calls)) == [0, 1] and not head_calls


def test_layer_specs(model_tok):
    assert F.resolve_layers("middle", 30) == [15]
    assert F.resolve_layers([-1, 0, "3"], 4) == [0, 3, 4]
    with pytest.raises(ValueError, match="layers 0..4"):
        F.resolve_layers(9, 4)
    with pytest.raises(ValueError, match="unknown position"):
        F.extract_features(*model_tok, samples(1), positions="first", progress=False)


def test_cache_is_reused_and_keyed_by_settings(model_tok, tmp_path, monkeypatch):
    model, tok = model_tok
    data = samples()
    first = F.extract_features(model, tok, data, layers=[1, 3], batch_size=2, cache_dir=tmp_path, progress=False)
    assert (first.cache_path / "features.npy").exists() and not list(first.cache_path.glob("part-*"))

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(F, "_forward_batch", boom)
    again = F.extract_features(model, tok, data, layers=[1, 3], batch_size=2, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(first.values, again.values)
    with pytest.raises(AssertionError, match="recomputed"):  # other settings, other key
        F.extract_features(model, tok, data, layers=[2], batch_size=2, cache_dir=tmp_path, progress=False)


def test_interrupted_run_resumes_from_finished_batches(model_tok, tmp_path, monkeypatch):
    model, tok = model_tok
    data = samples(7)
    real = F._forward_batch
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(F, "_forward_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        F.extract_features(model, tok, data, layers=[2], batch_size=2, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*/part-*.npy"))) == 2
    calls.clear()
    monkeypatch.setattr(F, "_forward_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = F.extract_features(model, tok, data, layers=[2], batch_size=2, cache_dir=tmp_path, progress=False)
    assert len(calls) == 2  # 4 batches of 2 (the last of 1), 2 already done
    fresh = F.extract_features(model, tok, data, layers=[2], batch_size=2, progress=False)
    np.testing.assert_allclose(resumed.values, fresh.values, atol=1e-6)


def test_weights_change_invalidates_cache(tmp_path):
    tok = make_tokenizer()
    a, b = make_model(len(tok), seed=0), make_model(len(tok), seed=1)
    fa = F.extract_features(a, tok, samples(2), layers=[1], cache_dir=tmp_path, progress=False)
    fb = F.extract_features(b, tok, samples(2), layers=[1], cache_dir=tmp_path, progress=False)
    assert fa.cache_path != fb.cache_path and not np.allclose(fa.values, fb.values)
