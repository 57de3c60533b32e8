"""Row-chunked access to feature matrices that may not fit in memory.

Detectors that must scale past memory read their input through three functions: `n_rows`, `iter_chunks` (rows
in order, a bounded block at a time) and `take` (chosen rows). They accept an in-memory array, or any object with
`shape`, `iter_chunks(size)` and `take(indices)`: a `saft.features.FeatureMatrix` (rows in the feature store's
memory-mapped shards) or an `NpyMatrix` (a `.npy` file on disk). Neither keeps what it has read mapped, so a pass
over a matrix of any size holds one chunk at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

CHUNK_ROWS = 8192


def is_out_of_core(X) -> bool:
    """True for a matrix read by chunks (an object with `iter_chunks`) or a memory map."""
    return hasattr(X, "iter_chunks") or isinstance(X, np.memmap)


def n_rows(X) -> int:
    return int(X.shape[0])


def compute_dtype(X) -> np.dtype:
    """float32 arithmetic for a float16/float32 source (the store's, a file's), float64 otherwise."""
    dtype = np.dtype(getattr(X, "dtype", np.float64))
    return np.dtype(np.float32) if dtype in (np.float16, np.float32) else np.dtype(np.float64)


def cast(block, dtype=None, *, shift: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """`block`, minus `shift` when one is given, as an array of `dtype` (None: `out`'s, else the block's own):
    a new array, or written into `out[:len(block)]`. float16 sources are widened by torch, in the same pass as
    the shift: numpy's scalar float16 conversion runs at about a tenth of the speed, which made it the largest
    cost of a pass over the feature store."""
    block = np.asarray(block)
    dtype = np.dtype(dtype) if dtype is not None else out.dtype if out is not None else block.dtype
    dest = out[: len(block)] if out is not None else np.empty(block.shape, dtype=dtype)
    if not block.size:
        return dest
    if block.dtype != np.float16 and shift is None:
        np.copyto(dest, block)
        return dest
    import warnings

    import torch

    with warnings.catch_warnings():  # a read-only map is only read here
        warnings.simplefilter("ignore", UserWarning)
        src, target = torch.from_numpy(np.ascontiguousarray(block)), torch.from_numpy(dest)
        if shift is None:
            target.copy_(src)
        else:
            torch.sub(src, torch.from_numpy(np.asarray(shift, dtype=dtype)), out=target)
    return dest


def iter_blocks(X, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Consecutive row blocks of X in its own dtype, for a single pass that only reads them: a block may be a view
    of X or a buffer the next block overwrites. Cheaper than `iter_chunks` (no copy, no allocation per block)."""
    if hasattr(X, "blocks"):
        yield from X.blocks(size)
    elif hasattr(X, "iter_chunks"):
        yield from X.iter_chunks(size)
    else:
        for start in range(0, X.shape[0], size):
            yield X[start:start + size]


def iter_chunks(X, size: int = CHUNK_ROWS, *, dtype=np.float64) -> Iterator[np.ndarray]:
    """Consecutive row blocks of X (at most `size` rows each) as in-memory arrays of `dtype` (None: X's own).
    Each block is the caller's own (never a view of an in-memory X), so it may be modified in place."""
    if hasattr(X, "iter_chunks"):  # these read fresh arrays from disk
        for chunk in X.iter_chunks(size):
            chunk = np.asarray(chunk)
            yield chunk if dtype is None or chunk.dtype == dtype else cast(chunk, dtype)
        return
    for start in range(0, X.shape[0], size):
        yield cast(X[start:start + size], dtype)


def take(X, indices, *, dtype=np.float64) -> np.ndarray:
    """Rows `indices` of X as an in-memory array of `dtype`."""
    indices = np.asarray(indices, dtype=np.int64)
    if hasattr(X, "take") and not isinstance(X, np.ndarray):
        return np.asarray(X.take(indices), dtype=dtype)
    return np.asarray(X[indices], dtype=dtype)


def map_chunks(fn, X, size: int = CHUNK_ROWS) -> np.ndarray:
    """`fn` applied to each row block of X (float32 for a float16/float32 source, else float64), the results
    concatenated: a chunked decision function."""
    parts = [fn(chunk) for chunk in iter_chunks(X, size, dtype=compute_dtype(X))]
    return np.concatenate(parts) if parts else np.zeros(0)


def npy_header(path: str | os.PathLike) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of a `.npy` file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return tuple(shape), fortran, np.dtype(dtype), f.tell()


class Columns:
    """Columns `start:stop` of a chunked source, itself a chunked source (a view's block of columns)."""

    def __init__(self, X, start: int, stop: int):
        self.X, self.start, self.stop = X, start, stop
        self.shape = (X.shape[0], stop - start)

    def __len__(self) -> int:
        return self.shape[0]

    def iter_chunks(self, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        for chunk in iter_chunks(self.X, size, dtype=None):
            yield chunk[:, self.start:self.stop]

    def take(self, indices) -> np.ndarray:
        return take(self.X, indices, dtype=None)[:, self.start:self.stop]


class HStack:
    """Chunked sources (or arrays) of the same rows side by side, itself a chunked source: a detector's view
    (sentence-encoder columns, then each position's hidden states) read a chunk at a time from the files behind
    it. `np.asarray` of it gathers every row into memory."""

    def __init__(self, parts):
        self.parts = list(parts)
        rows = {int(part.shape[0]) for part in self.parts}
        if len(rows) != 1:
            raise ValueError(f"HStack parts have different row counts: {sorted(rows)}")
        self.shape = (rows.pop(), sum(int(part.shape[1]) for part in self.parts))
        self.dtype = np.result_type(*[getattr(part, "dtype", np.float64) for part in self.parts])

    def __len__(self) -> int:
        return self.shape[0]

    def iter_chunks(self, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        for blocks in zip(*[iter_chunks(part, size, dtype=self.dtype) for part in self.parts]):
            yield np.hstack(blocks)

    def take(self, indices) -> np.ndarray:
        return np.hstack([take(part, indices, dtype=self.dtype) for part in self.parts])

    def __array__(self, dtype=None, copy=None):
        arr = np.hstack([np.asarray(part, dtype=self.dtype) for part in self.parts])
        return arr if dtype is None else arr.astype(dtype)


class NpyMatrix:
    """A 2-d `.npy` file read by explicit reads, never mapped: memory stays at one chunk however large the file.
    `rows` reads only the first rows."""

    def __init__(self, path: str | os.PathLike, rows: int | None = None):
        self.path = Path(path)
        shape, fortran, dtype, self.offset = npy_header(self.path)
        if fortran or len(shape) != 2:
            raise ValueError(f"{self.path}: expected a C-ordered 2-d array, got shape {shape}")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        expected = self.offset + self.shape[0] * self.shape[1] * self.dtype.itemsize
        if os.path.getsize(self.path) != expected:
            raise ValueError(f"{self.path} is truncated or padded: {os.path.getsize(self.path)} bytes, expected {expected}")
        if rows is not None:
            self.shape = (min(rows, self.shape[0]), self.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, f, start: int, stop: int) -> np.ndarray:
        row = self.shape[1] * self.dtype.itemsize
        f.seek(self.offset + start * row)
        return np.fromfile(f, dtype=self.dtype, count=(stop - start) * self.shape[1]).reshape(stop - start, self.shape[1])

    def iter_chunks(self, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        with open(self.path, "rb") as f:
            for start in range(0, self.shape[0], size):
                yield self._read(f, start, min(start + size, self.shape[0]))

    def blocks(self, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        """As `iter_chunks`, read into one reused buffer (see `iter_blocks`)."""
        buf = np.empty((min(size, self.shape[0]), self.shape[1]), dtype=self.dtype)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for start in range(0, self.shape[0], size):
                block = buf[: min(size, self.shape[0] - start)]
                if f.readinto(memoryview(block).cast("B")) != block.nbytes:
                    raise ValueError(f"{self.path}: short read at row {start}")
                yield block

    def take(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.shape[1]), dtype=self.dtype)
        order = np.argsort(indices, kind="stable")
        with open(self.path, "rb") as f:
            for j in order:  # ascending offsets: one seek per row, read in file order
                out[j] = self._read(f, indices[j], indices[j] + 1)[0]
        return out

    def __array__(self, dtype=None, copy=None):
        arr = np.concatenate(list(self.iter_chunks())) if self.shape[0] else np.zeros(self.shape, self.dtype)
        return arr if dtype is None else arr.astype(dtype)
