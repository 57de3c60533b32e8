"""The paper's subspace score (SAFT): energy of a centred embedding in the pool's top singular directions.

    s_i = (1/k) * sum_{j<=k} w_j * <f_i - mean, v_j>^2

with v_j the top-k right singular vectors of the centred pool matrix and w_j = 1 (the paper's reading) or
w_j = sigma_j (HaloScope's weighted variant, `weighted=True`). Squaring makes the score independent of the
arbitrary sign of each singular vector. Higher = more suspicious. numpy only.

Pools that do not fit in memory (a `saft.chunks` source: the feature store's `FeatureMatrix`, an `NpyMatrix`,
a memory map) or larger than `max_in_memory` values are fitted by streaming (`solver="streaming"`): one pass for
the mean and scale, then block subspace iteration on the covariance, one pass per iteration, each pass reading a
chunk at a time and keeping only d x (k + oversampling) numbers, with a Rayleigh-Ritz step on the block until
the top-k directions stop moving. Its scores match the full SVD's within 1e-4 (tests/test_subspace.py); scoring
is chunked too.

`standardize=True` (not in the paper) divides each feature by its pool standard deviation first: LLM residual
streams carry a few dimensions with huge activations that otherwise dominate the top singular vectors.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.extmath import randomized_svd
from sklearn.utils.validation import check_array, check_is_fitted

from ..chunks import cast, compute_dtype, is_out_of_core, iter_blocks, n_rows, take

SOLVERS = ("auto", "full", "streaming")


def _shift(X) -> np.ndarray:
    """A provisional centre: the mean of X's first block. Every streamed product is taken of X minus it, so the
    pool's mean (large in a residual stream) never enters a float32 sum; the exact mean is corrected for later."""
    first = next(iter_blocks(X, 4096))
    return np.asarray(first, dtype=np.float64).mean(axis=0)


def streaming_moments(X, shift: np.ndarray, *, chunk_rows: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, population standard deviation, n) of X's columns in one chunked pass over Y = X - shift (sums in
    float32 per block, float64 across blocks; Y's mean is near zero, so the variance does not cancel)."""
    dtype = compute_dtype(X)
    buf = np.empty((min(chunk_rows, n_rows(X)), X.shape[1]), dtype=dtype)
    n, total, squares = 0, np.zeros(X.shape[1]), np.zeros(X.shape[1])
    for block in iter_blocks(X, chunk_rows):
        y = cast(block, shift=shift, out=buf)
        n += len(y)
        total += y.sum(axis=0)
        squares += np.einsum("ij,ij->j", y, y)
    if n == 0:
        raise ValueError("X has no rows")
    mean_y = total / n
    return shift + mean_y, np.sqrt(np.clip(squares / n - mean_y**2, 0, None)), n


def _warm_start(X, mean: np.ndarray, scale: np.ndarray, block: int, *, sample_rows: int = 8192,
                random_state: int = 0) -> np.ndarray:
    """An orthonormal (d, block) start for the iteration: the top directions of a random sample of rows, by
    sklearn's in-memory randomized SVD. A random start needs two or three full passes just to find the subspace;
    the sample's costs less than one."""
    rng = np.random.default_rng(random_state)
    n = n_rows(X)
    rows = np.sort(rng.choice(n, size=min(n, sample_rows), replace=False))
    sample = (take(X, rows) - mean) / scale
    block = min(block, *sample.shape)
    _, _, vt = randomized_svd(sample, n_components=block, n_iter=4, random_state=random_state)
    return vt.T


def streaming_top_directions(X, mean: np.ndarray, scale: np.ndarray, k: int, *, shift: np.ndarray,
                             oversample: int = 10, tol: float = 1e-4, max_iter: int = 100, chunk_rows: int = 8192,
                             random_state: int = 0):
    """Top-k right singular vectors (k, d) and singular values (k,) of A = (X - mean) / scale, X read by chunks.

    Block subspace iteration on C = A^T A, one pass per iteration: with Y = X - shift, W = Q / scale and
    m = mean - shift, C Q = ((Y^T (Y W)) - n m (m^T W)) / scale, Y^T (Y W) summed block by block (float32
    products for a float16/float32 source, float64 across blocks); then Rayleigh-Ritz on Q^T C Q and Q = orth(CQ).
    The angle between the top-k subspace and the true one shrinks by lambda_(k+oversample+1) / lambda_k a pass; it
    stops when the sine of the largest angle between successive top-k subspaces is below `tol`; the true angle is
    then about `tol` times that ratio, which keeps the scores within 1e-4 of the full SVD's (tests/test_subspace.py).
    Returns (components, singular values, iterations)."""
    n, d = n_rows(X), len(mean)
    block = min(d, k + oversample)
    dtype = compute_dtype(X)
    Q = _warm_start(X, mean, scale, block, random_state=random_state)
    m = mean - shift
    buf = np.empty((min(chunk_rows, n), d), dtype=dtype)
    previous = None
    for it in range(1, max_iter + 1):
        W = Q / scale[:, None]
        Wc = W.astype(dtype)
        G = np.zeros((d, block))
        for chunk in iter_blocks(X, chunk_rows):
            y = cast(chunk, shift=shift, out=buf)
            G += y.T @ (y @ Wc)
        Z = (G - n * np.outer(m, m @ W)) / scale[:, None]
        # Rayleigh-Ritz: the best approximations to C's eigenpairs within span(Q)
        theta, U = np.linalg.eigh(Q.T @ Z)
        order = np.argsort(theta)[::-1]
        theta, U = theta[order], U[:, order]
        V = Q @ U[:, :k]
        Q, _ = np.linalg.qr(Z @ U)
        if previous is not None:
            cosines = np.linalg.svd(previous.T @ V, compute_uv=False)
            if np.sqrt(max(0.0, 1.0 - cosines.min() ** 2)) < tol:
                break
        previous = V
    return V.T, np.sqrt(np.clip(theta[:k], 0, None)), it


class SubspaceScorer(BaseEstimator):
    """Mean squared projection of centred features on the top `n_components` singular vectors.

    Parameters
    ----------
    n_components : int, default=1
        k, the number of singular vectors (the paper searches 1..4).
    weighted : bool, default=False
        Weight each squared projection by its singular value.
    standardize : bool, default=False
        Scale every feature to unit variance over the pool before the SVD.
    solver : {"auto", "full", "streaming"}, default="auto"
        "full": numpy's SVD of the whole matrix in memory; "streaming": chunked passes (see the module
        docstring); "auto": streaming for an out-of-core X or one over `max_in_memory` values, else full.
    max_in_memory : int, default=50_000_000
        The largest n * d that "auto" fits in memory (400 MB of float64).
    chunk_rows : int, default=8192
        Rows per chunk when streaming and when scoring an out-of-core X.

    Attributes
    ----------
    mean_ : (d,) pool mean.
    scale_ : (d,) pool standard deviation used for scaling (ones without `standardize`).
    components_ : (k, d) top right singular vectors.
    singular_values_ : (k,) their singular values.
    n_iter_ : number of streaming passes after the moments (0 for the full SVD).
    """

    def __init__(self, n_components: int = 1, weighted: bool = False, standardize: bool = False,
                 solver: str = "auto", max_in_memory: int = 50_000_000, chunk_rows: int = 8192):
        self.n_components = n_components
        self.weighted = weighted
        self.standardize = standardize
        self.solver = solver
        self.max_in_memory = max_in_memory
        self.chunk_rows = chunk_rows

    def _streams(self, X) -> bool:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.solver == "auto":
            return is_out_of_core(X) or X.shape[0] * X.shape[1] > self.max_in_memory
        return self.solver == "streaming"

    def _check_k(self, shape) -> None:
        if not isinstance(self.n_components, (int, np.integer)) or not 1 <= self.n_components <= min(shape):
            raise ValueError(f"n_components must be an integer in 1..{min(shape)} for X of shape {shape}, "
                             f"got {self.n_components!r}")

    def fit(self, X, y=None):
        if not hasattr(X, "shape"):
            X = np.asarray(X)
        if self._streams(X):
            if len(X.shape) != 2:
                raise ValueError(f"expected a 2-d matrix, got shape {X.shape}")
            self._check_k(X.shape)
            shift = _shift(X)
            self.mean_, std, _ = streaming_moments(X, shift, chunk_rows=self.chunk_rows)
            self.scale_ = np.where(std > 0, std, 1.0) if self.standardize else np.ones(X.shape[1])
            self.components_, self.singular_values_, self.n_iter_ = streaming_top_directions(
                X, self.mean_, self.scale_, self.n_components, shift=shift, chunk_rows=self.chunk_rows)
            self.n_features_in_ = X.shape[1]
            return self
        X = check_array(X, dtype=np.float64)
        self._check_k(X.shape)
        self.n_iter_ = 0
        self.mean_ = X.mean(axis=0)
        # A constant feature would divide by zero; it carries no information, so leave it unscaled.
        self.scale_ = np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0) if self.standardize else np.ones(X.shape[1])
        # full_matrices=False: only the top directions are needed; d can be thousands.
        _, s, vt = np.linalg.svd((X - self.mean_) / self.scale_, full_matrices=False)
        self.components_ = vt[: self.n_components]
        self.singular_values_ = s[: self.n_components]
        self.n_features_in_ = X.shape[1]
        return self

    def score_samples(self, X) -> np.ndarray:
        """harm_score per row: higher = more suspicious."""
        check_is_fitted(self, "components_")
        if not is_out_of_core(X):
            X = check_array(X, dtype=np.float64)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but the scorer was fitted on {self.n_features_in_}")
        weights = self.singular_values_ if self.weighted else np.ones(self.n_components)

        if not is_out_of_core(X):  # in memory: float64, as the fit
            proj = ((X - self.mean_) / self.scale_) @ self.components_.T  # (n, k)
            return (proj**2 * weights).mean(axis=1)
        dtype = compute_dtype(X)
        shift, W = _shift(X), (self.components_ / self.scale_).T
        offset = (self.mean_ - shift) @ W  # the rows' shift to the fitted mean, in projection space
        Wc, buf = W.astype(dtype), np.empty((min(self.chunk_rows, n_rows(X)), X.shape[1]), dtype=dtype)
        parts = []
        for chunk in iter_blocks(X, self.chunk_rows):
            proj = cast(chunk, shift=shift, out=buf) @ Wc - offset
            parts.append((proj**2 * weights).mean(axis=1))
        return np.concatenate(parts) if parts else np.zeros(0)

    def decision_function(self, X) -> np.ndarray:
        return self.score_samples(X)
