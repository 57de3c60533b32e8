"""Detectors on pools read a chunk at a time (saft.chunks): the same scores as in memory, bounded fitting."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from saft.chunks import Columns, NpyMatrix, iter_chunks, take
from saft.detectors import get_detector
from saft.detectors.model_guard import fit_rows
from test_guard import weights_file
from test_model_guard import view


def on_disk(tmp_path, X, name="x.npy"):
    np.save(tmp_path / name, X)
    return NpyMatrix(tmp_path / name)


def test_npy_matrix_reads_chunks_rows_and_columns(tmp_path):
    X = np.arange(60, dtype=np.float32).reshape(12, 5)
    m = on_disk(tmp_path, X)
    assert m.shape == (12, 5) and len(list(m.iter_chunks(5))) == 3
    np.testing.assert_array_equal(np.concatenate(list(iter_chunks(m, 5))), X)
    np.testing.assert_array_equal(take(m, [11, 0, 4]), X[[11, 0, 4]])
    np.testing.assert_array_equal(np.concatenate(list(iter_chunks(Columns(m, 1, 3), 7))), X[:, 1:3])
    np.testing.assert_array_equal(np.asarray(m), X)
    with open(tmp_path / "x.npy", "r+b") as f:
        f.truncate(200)
    with pytest.raises(ValueError, match="truncated"):
        NpyMatrix(tmp_path / "x.npy")


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_guard_scores_a_chunked_pool_as_it_scores_an_array(kernel, tmp_path):
    rng = np.random.default_rng(0)
    S = rng.normal(size=(9000, 768)).astype(np.float32)  # over two of the decision function's 4096-row blocks
    guard = get_detector("guard", kernel=kernel).fit(S)
    disk = on_disk(tmp_path, S)
    np.testing.assert_allclose(guard.score_samples(disk), guard.score_samples(S), rtol=1e-12, atol=1e-12)
    assert guard.contamination_estimate(disk) == guard.contamination_estimate(S)


def test_guard_model_on_a_chunked_pool_matches_the_array(tmp_path):
    rng = np.random.default_rng(0)
    y_ref, X_ref = view(rng, 400, harmful_every=3)
    y, X = view(rng, 300, shift=2.0)
    w = weights_file(tmp_path, [1.0], -1.0, 0.8, 0.2)
    kw = dict(weights=w, kernel="linear", n_components=2)
    mem = get_detector("label-free", **kw).fit(X, reference_X=X_ref, reference_y=y_ref)
    disk = on_disk(tmp_path, X, "pool.npy")
    chunked = get_detector("label-free", **kw).fit(disk, reference_X=X_ref, reference_y=y_ref)
    np.testing.assert_allclose(chunked.score_samples(disk), mem.score_samples(X), atol=1e-9)
    assert chunked.contamination_estimate(disk) == mem.contamination_estimate(X)
    np.testing.assert_array_equal(chunked.pseudo_labels_, mem.pseudo_labels_)


def test_guard_model_fits_its_pool_side_on_a_bounded_sample(tmp_path):
    rng = np.random.default_rng(1)
    y_ref, X_ref = view(rng, 400, harmful_every=3)
    y, X = view(rng, 3000, shift=2.0)
    w = weights_file(tmp_path, [1.0], -1.0, 0.8, 0.2)
    kw = dict(weights=w, kernel="linear", n_components=2)
    full = get_detector("label-free", **kw).fit(X, reference_X=X_ref, reference_y=y_ref)
    # 500 rows of the 3-wide hidden block
    sampled = get_detector("label-free", max_fit_values=1500, **kw).fit(X, reference_X=X_ref, reference_y=y_ref)
    assert len(sampled.fit_rows_) == 500 == len(sampled.pseudo_labels_) and len(full.fit_rows_) == 3000
    assert sampled.components_[-1].n_samples_ == 500
    # every row is still scored, still well, and the sample is seeded: a refit gives the same scores
    s = sampled.score_samples(X)
    assert s.shape == (3000,) and roc_auc_score(y, s) > 0.95 and roc_auc_score(y, full.score_samples(X)) > 0.95
    again = get_detector("label-free", max_fit_values=1500, **kw).fit(X, reference_X=X_ref, reference_y=y_ref)
    np.testing.assert_array_equal(again.score_samples(X), s)
    np.testing.assert_array_equal(fit_rows(10, 20), np.arange(10))
    r = fit_rows(1000, 100)
    assert len(np.unique(r)) == 100 and (np.diff(r) > 0).all()
