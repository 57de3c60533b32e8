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


@pytest.mark.parametrize("max_length,store", [(512, False), (24, False), (512, True)])
def test_every_layer_and_position_matches_a_full_forward_pass(model_tok, max_length, store, tmp_path):
    model, tok = model_tok
    data = samples()
    feats = F.extract_features(model, tok, data, layers="all", positions=list(F.POSITIONS), max_length=max_length,
                               batch_size=3, progress=False, cache_dir=tmp_path if store else None)
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


def counting(monkeypatch):
    """Patch the forward pass to count the rows it runs."""
    real, rows = F._forward_batch, []

    def counted(model, blocks, layers, n_layers, batch, *a, **k):
        rows.append(len(batch))
        return real(model, blocks, layers, n_layers, batch, *a, **k)

    monkeypatch.setattr(F, "_forward_batch", counted)
    return rows


def test_store_reuses_rows_by_content_for_any_subset_order_and_slot(model_tok, tmp_path, monkeypatch):
    model, tok = model_tok
    data = samples(7)
    first = F.extract_features(model, tok, data, layers=[1, 3], positions=["prompt_last", "response_mean"],
                               batch_size=2, cache_dir=tmp_path, progress=False)
    rows = counting(monkeypatch)
    # a subset, reordered, plus rows seen nowhere: only the new rows run through the model
    new = [Sample(id=f"n{i}", messages=[{"role": "user", "content": f"new {i}"}, {"role": "assistant", "content": "ok"}])
           for i in range(3)]
    mixed = [data[5], new[0], data[0], data[2], new[1], new[2], new[1]]
    again = F.extract_features(model, tok, mixed, layers=[3], positions=["response_mean"], batch_size=2,
                               cache_dir=tmp_path, progress=False)
    assert sum(rows) == 3  # new[1] twice: computed once
    for j, i in [(0, 5), (2, 0), (3, 2)]:
        np.testing.assert_array_equal(again.get(3, "response_mean")[j], first.get(3, "response_mean")[i])
    np.testing.assert_array_equal(again.get(3, "response_mean")[4], again.get(3, "response_mean")[6])
    fresh = F.extract_features(model, tok, mixed, layers=[3], positions=["response_mean"], progress=False)
    np.testing.assert_allclose(again.get(3, "response_mean"), fresh.get(3, "response_mean"), atol=1e-5)
    # the same rows at a layer no run asked for are computed, the others read
    rows.clear()
    F.extract_features(model, tok, data, layers=[2, 3], positions=["prompt_last"], cache_dir=tmp_path, progress=False)
    assert sum(rows) == 7
    rows.clear()
    F.extract_features(model, tok, data, layers=[2], positions=["prompt_last"], max_length=256, cache_dir=tmp_path,
                       progress=False)
    assert sum(rows) == 7  # another maximum length is another slot


def test_store_only_reads_never_computes_and_names_the_missing_rows(model_tok, tmp_path, monkeypatch):
    """`compute_missing=False` (the Ray engine's driver) raises at the first block with a row the store lacks and
    runs no forward pass; `missing_rows` names each missing distinct row once; once stored, every row is read."""
    model, tok = model_tok
    data = samples()
    kw = dict(layers=[2], positions=["prompt_last", "last"], max_length=64, cache_dir=tmp_path, progress=False)
    F.extract_features(model, tok, data[:4], **kw)  # two slots, rows 0-3 stored
    calls = []
    forward = F._forward_batch
    monkeypatch.setattr(F, "_forward_batch", lambda *a, **k: calls.append(1) or forward(*a, **k))
    with pytest.raises(F.MissingFeatures):
        F.extract_features(model, tok, data, compute_missing=False, **kw)
    assert calls == []
    twice = data + [data[5]]  # a repeated row is named at its first position
    assert F.missing_rows(model, tok, twice, layers=[2], positions=["prompt_last", "last"], max_length=64,
                          cache_dir=tmp_path).tolist() == [4, 5, 6]
    F.extract_features(model, tok, data[4:], **kw)
    feats = F.extract_features(model, tok, data, compute_missing=False, **kw)
    assert calls and feats.n_computed == 0 and feats.get(2, "last").shape == (len(data), 32)
    with pytest.raises(ValueError, match="needs a cache_dir"):
        F.extract_features(model, tok, data, compute_missing=False, layers=[2], progress=False)


def test_store_matrix_reads_in_chunks_and_matches_get(model_tok, tmp_path):
    from saft.chunks import iter_chunks, take

    model, tok = model_tok
    feats = F.extract_features(model, tok, samples(7), layers=[2], batch_size=3, cache_dir=tmp_path, progress=False)
    m = feats.matrix(2, "prompt_last")
    assert m.shape == (7, 32)
    np.testing.assert_array_equal(np.concatenate(list(iter_chunks(m, 3, dtype=np.float32))), feats.get(2))
    np.testing.assert_array_equal(take(m, [6, 0, 3], dtype=np.float32), feats.get(2)[[6, 0, 3]])


def test_interrupted_run_resumes_from_finished_shards(model_tok, tmp_path, monkeypatch):
    model, tok = model_tok
    data = samples(7)
    monkeypatch.setattr(F, "FLUSH_SECONDS", 0.0)  # a shard after every batch
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
    assert len(list(tmp_path.glob("rows-v2/*/shard-*.keys.npy"))) == 2
    monkeypatch.setattr(F, "_forward_batch", real)
    rows = counting(monkeypatch)
    resumed = F.extract_features(model, tok, data, layers=[2], batch_size=2, cache_dir=tmp_path, progress=False)
    assert sum(rows) == 3  # 4 rows were in the two finished shards
    fresh = F.extract_features(model, tok, data, layers=[2], batch_size=2, progress=False)
    np.testing.assert_allclose(resumed.get(2), fresh.get(2), atol=1e-5)


def test_damaged_or_half_written_shards_are_never_trusted(model_tok, tmp_path, monkeypatch, caplog):
    model, tok = model_tok
    data = samples(6)
    monkeypatch.setattr(F, "FLUSH_SECONDS", 0.0)
    good = F.extract_features(model, tok, data, layers=[2], batch_size=3, cache_dir=tmp_path, progress=False).get(2)
    shards = sorted(tmp_path.glob("rows-v2/*/shard-*[0-9a-f].npy"))
    assert len(shards) == 2
    with open(shards[0], "r+b") as f:  # a data file cut short (a crash or a bad copy)
        f.truncate(shards[0].stat().st_size - 40)
    (shards[0].parent / f".{shards[1].name}.tmp123").write_bytes(b"half")  # a temporary file left by a crash
    rows = counting(monkeypatch)
    again = F.extract_features(model, tok, data, layers=[2], batch_size=3, cache_dir=tmp_path, progress=False)
    assert sum(rows) == 3 and "incomplete or damaged" in caplog.text
    np.testing.assert_allclose(again.get(2), good, atol=1e-6)
    assert not shards[0].exists()
    rows.clear()
    F.extract_features(model, tok, data, layers=[2], batch_size=3, cache_dir=tmp_path, progress=False)
    assert not rows


WORKER = """
import sys, numpy as np
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import saft.features as F
from conftest import make_model, make_tokenizer
from test_features import samples
F.FLUSH_SECONDS = 0.0
tok = make_tokenizer()
model = make_model(len(tok), n_layers=4)
data = samples(12)[int(sys.argv[4]):]
for _ in range(3):
    f = F.extract_features(model, tok, data, layers=[1, 2], batch_size=1, cache_dir=sys.argv[3], progress=False)
np.save(sys.argv[5], f.get(2))
"""


def test_two_processes_share_one_store(model_tok, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    model, tok = model_tok
    tests, src = Path(__file__).parent, Path(F.__file__).parents[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, str(script), str(src), str(tests), str(cache), str(skip),
                               str(tmp_path / f"out{skip}.npy")]) for skip in (0, 3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    data = samples(12)
    fresh = F.extract_features(model, tok, data, layers=[2], progress=False).get(2)
    np.testing.assert_allclose(np.load(tmp_path / "out0.npy"), fresh, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "out3.npy"), fresh[3:], atol=1e-5)
    # every shard either process wrote is whole, and the store holds every row
    import saft.features as G

    def boom(*a, **k):
        raise AssertionError("recomputed a row both processes stored")

    real, G._forward_batch = G._forward_batch, boom
    try:
        shared = F.extract_features(model, tok, data, layers=[1, 2], cache_dir=cache, progress=False)
    finally:
        G._forward_batch = real
    np.testing.assert_allclose(shared.get(2), fresh, atol=1e-5)
    assert not list(cache.glob("rows-v2/*/.*"))  # no temporary file left behind


def test_weights_change_invalidates_cache(tmp_path):
    tok = make_tokenizer()
    a, b = make_model(len(tok), seed=0), make_model(len(tok), seed=1)
    fa = F.extract_features(a, tok, samples(2), layers=[1], cache_dir=tmp_path, progress=False)
    fb = F.extract_features(b, tok, samples(2), layers=[1], cache_dir=tmp_path, progress=False)
    assert not np.allclose(fa.values, fb.values)
    assert len(list(tmp_path.glob("rows-v2/*/slot.json"))) == 2
