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
from sklearn.utils.validation import check_array, check_is_fitted

from ..chunks import is_out_of_core, iter_chunks

SOLVERS = ("auto", "full", "streaming")


def compute_dtype(X) -> np.dtype:
    """float32 arithmetic for a float16/float32 source (the store's, a file's), float64 otherwise."""
    dtype = np.dtype(getattr(X, "dtype", np.float64))
    return np.dtype(np.float32) if dtype in (np.float16, np.float32) else np.dtype(np.float64)


def streaming_moments(X, *, chunk_rows: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, population standard deviation, n) of X's columns in one chunked pass (Chan et al.'s pairwise
    update, accumulated in float64, so a large mean does not cancel the variance)."""
    n, mean, m2 = 0, None, None
    for chunk in iter_chunks(X, chunk_rows, dtype=compute_dtype(X)):
        c_n, c_mean = len(chunk), chunk.mean(axis=0, dtype=np.float64)
        chunk -= c_mean.astype(chunk.dtype)
        c_m2 = np.einsum("ij,ij->j", chunk, chunk, dtype=np.float64)
        if mean is None:
            n, mean, m2 = c_n, c_mean, c_m2
            continue
        delta, total = c_mean - mean, n + c_n
        mean = mean + delta * (c_n / total)
        m2 = m2 + c_m2 + delta**2 * (n * c_n / total)
        n = total
    if mean is None:
        raise ValueError("X has no rows")
    return mean, np.sqrt(m2 / n), n


def streaming_top_directions(X, mean: np.ndarray, scale: np.ndarray, k: int, *, oversample: int = 20,
                             tol: float = 1e-7, max_iter: int = 100, chunk_rows: int = 8192, random_state: int = 0):
    """Top-k right singular vectors (k, d) and singular values (k,) of A = (X - mean) / scale, X read by chunks.

    Block subspace iteration on C = A^T A: Z = C Q in one pass (chunk by chunk, Z += A_c^T (A_c Q), with the
    scale folded into Q so a chunk is only centred in place; float32 products for a float16/float32 source,
    summed in float64), then Rayleigh-Ritz on Q^T Z, then Q = orth(Z). Stops when the sine of the largest angle
    between successive top-k subspaces is below `tol`. Returns (components, singular values, iterations)."""
    d = len(mean)
    block = min(d, k + oversample)
    dtype = compute_dtype(X)
    rng = np.random.default_rng(random_state)
    Q, _ = np.linalg.qr(rng.standard_normal((d, block)))
    previous, centre = None, mean.astype(dtype)
    for it in range(1, max_iter + 1):
        Z = np.zeros((d, block))
        Qs = (Q / scale[:, None]).astype(dtype)
        for chunk in iter_chunks(X, chunk_rows, dtype=dtype):
            chunk -= centre
            Z += chunk.T @ (chunk @ Qs)
        Z /= scale[:, None]
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
            self.mean_, std, _ = streaming_moments(X, chunk_rows=self.chunk_rows)
            self.scale_ = np.where(std > 0, std, 1.0) if self.standardize else np.ones(X.shape[1])
            self.components_, self.singular_values_, self.n_iter_ = streaming_top_directions(
                X, self.mean_, self.scale_, self.n_components, chunk_rows=self.chunk_rows)
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
        centre, W = self.mean_.astype(dtype), (self.components_ / self.scale_).T.astype(dtype)
        parts = []
        for chunk in iter_chunks(X, self.chunk_rows, dtype=dtype):
            chunk -= centre
            proj = (chunk @ W).astype(np.float64)
            parts.append((proj**2 * weights).mean(axis=1))
        return np.concatenate(parts) if parts else np.zeros(0)

    def decision_function(self, X) -> np.ndarray:
        return self.score_samples(X)
