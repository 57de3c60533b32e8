import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from saft.detectors import SubspaceScorer, get_detector


def planted(n=600, d=64, frac=0.2, seed=0):
    """Benign: isotropic noise. Harmful: a cluster offset and spread inside a fixed 4-dim subspace."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (rng.random(n) < frac).astype(int)
    dirs = np.linalg.qr(rng.normal(size=(d, 4)))[0].T  # (4, d) orthonormal
    coef = 4.0 + 1.0 * rng.normal(size=((y == 1).sum(), 4))
    X[y == 1] += coef @ dirs
    return X, y


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_planted_cluster_is_found(k, weighted):
    X, y = planted()
    s = SubspaceScorer(n_components=k, weighted=weighted).fit(X).score_samples(X)
    assert roc_auc_score(y, s) > 0.98


def test_matches_definition_and_sign_invariance():
    X, _ = planted(n=100, d=10)
    sc = SubspaceScorer(n_components=3).fit(X)
    c = X - X.mean(0)
    v = np.linalg.svd(c, full_matrices=False)[2][:3]
    np.testing.assert_allclose(sc.score_samples(X), ((c @ v.T) ** 2).mean(1), rtol=1e-10)
    sc.components_ = -sc.components_  # a flipped singular vector gives the same score
    np.testing.assert_allclose(sc.score_samples(X), ((c @ v.T) ** 2).mean(1), rtol=1e-10)


def test_sklearn_conventions():
    X, _ = planted(n=50, d=8)
    sc = SubspaceScorer(n_components=2)
    assert sc.fit(X) is sc and sc.components_.shape == (2, 8) and sc.mean_.shape == (8,)
    assert clone(sc).get_params() == {"n_components": 2, "weighted": False, "standardize": False, "solver": "auto",
                                      "max_in_memory": 50_000_000, "chunk_rows": 8192}
    with pytest.raises(ValueError, match="n_components must be an integer in 1..8"):
        SubspaceScorer(n_components=9).fit(X)
    with pytest.raises(ValueError, match="fitted on 8"):
        sc.score_samples(X[:, :5])


def test_registry_suggests_names():
    assert isinstance(get_detector("subspace", n_components=2), SubspaceScorer)
    with pytest.raises(ValueError, match="Did you mean: subspace"):
        get_detector("subspce")


def test_standardize_finds_a_signal_hidden_by_a_huge_dimension():
    X, y = planted(n=600, d=64)
    rng = np.random.default_rng(1)
    X[:, 5] += 200.0 * rng.normal(size=len(X))  # a "massive activation" dimension with no information
    plain = SubspaceScorer(n_components=1).fit(X).score_samples(X)
    scaled = SubspaceScorer(n_components=1, standardize=True).fit(X).score_samples(X)
    assert roc_auc_score(y, plain) < 0.6 < 0.95 < roc_auc_score(y, scaled)


def hidden_like(n=3000, d=96, seed=3):
    """Rows like a residual stream: a large mean, a few huge columns, a decaying spectrum and noise."""
    rng = np.random.default_rng(seed)
    scales = 6.0 * 0.7 ** np.arange(12)
    X = 5.0 + rng.normal(size=(n, 12)) * scales @ np.linalg.qr(rng.normal(size=(d, 12)))[0].T
    X += rng.normal(size=(n, d))
    X[:, :3] *= 40.0
    return X


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("weighted,standardize", [(False, False), (True, False), (False, True)])
def test_streaming_svd_matches_numpys_within_1e4(k, weighted, standardize, tmp_path):
    from saft.chunks import NpyMatrix

    X = hidden_like()
    full = SubspaceScorer(n_components=k, weighted=weighted, standardize=standardize, solver="full").fit(X)
    np.save(tmp_path / "x.npy", X.astype(np.float32))
    disk = NpyMatrix(tmp_path / "x.npy")
    for source, solver in [(X, "streaming"), (disk, "auto")]:
        st = SubspaceScorer(n_components=k, weighted=weighted, standardize=standardize, solver=solver,
                            chunk_rows=700).fit(source)
        assert st.n_iter_ > 1  # it streamed, in several passes
        ref = full.score_samples(X)
        # float32 on disk rounds the inputs by ~1e-7 relative; the scores agree to 1e-4 of their scale
        np.testing.assert_allclose(st.score_samples(source), ref, atol=1e-4 * ref.max(), rtol=1e-4)
        np.testing.assert_allclose(st.singular_values_, full.singular_values_, rtol=1e-5)
        np.testing.assert_allclose(np.abs(st.components_ @ full.components_.T), np.eye(k), atol=1e-4)


def test_auto_solver_streams_only_what_memory_should_not_hold():
    X = hidden_like(n=400, d=20)
    assert SubspaceScorer(n_components=2).fit(X).n_iter_ == 0
    assert SubspaceScorer(n_components=2, max_in_memory=1000).fit(X).n_iter_ > 0
    with pytest.raises(ValueError, match="solver must be one of"):
        SubspaceScorer(solver="magic").fit(X)
