"""Selected rows of one store layer, read in chunks of bounded size.

In order, a chunk is one contiguous read covering the next selected rows. Shuffled (for
training out-of-core), the selected rows are cut into short blocks of consecutive rows, the
blocks are visited in a random order, and each chunk gathers many blocks and shuffles its rows:
stores are sorted by class, so this keeps every chunk a mixture of classes while each read stays
contiguous.

The layer is read through its own read-only h5py handle on the documented store layout
(`/features/<key>`), so memory never holds more than a chunk of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import h5py
import numpy as np

from featx.store.feature_store import LAYER_JOIN, FeatureStore, iter_sorted_rows

__all__ = ["LayerRows"]

DEFAULT_CHUNK_BYTES = 64 << 20  # float32 bytes of one chunk
BLOCK_BYTES = 1 << 20  # a shuffled block is at most about one HDF5 chunk of the store
BLOCKS_PER_CHUNK = 16  # at least, so that a shuffled chunk mixes many parts of the store


class LayerRows:
    """Chunked access to the rows of layer `key` of `store`; use as a context manager.

    >>> with LayerRows(store, "layer4", chunk_bytes=16 << 20) as rows:
    ...     for positions, X in rows.iter(index):
    ...         ...  # X holds rows index[positions]
    """

    def __init__(
        self, store: FeatureStore, key: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.key = store.resolve(key)
        self._file = h5py.File(store.path, "r")
        self.dataset = self._file["features"][self.key]
        self.row_shape: tuple[int, ...] = tuple(self.dataset.shape[1:])
        self.dtype = self.dataset.dtype
        self.row_bytes = max(1, int(np.prod(self.row_shape)) * 4)  # as float32
        self.chunk_rows = max(1, chunk_bytes // self.row_bytes)
        self.block_rows = max(
            1, min(self.chunk_rows // BLOCKS_PER_CHUNK, BLOCK_BYTES // self.row_bytes)
        )

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> LayerRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def nbytes(self, n_rows: int) -> int:
        """float32 bytes of `n_rows` rows."""
        return n_rows * self.row_bytes

    def iter(
        self, index: np.ndarray, rng: np.random.RandomState | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (positions, rows) with rows == layer[index[positions]], at most `chunk_rows`
        rows at a time: in order, or block-shuffled with `rng`. `index` must be sorted."""
        index = np.asarray(index, dtype=np.int64)
        if rng is None:
            yield from self._in_order(index)
        else:
            yield from self._shuffled(index, rng)

    def read(self, index: np.ndarray) -> np.ndarray:
        """The rows `index` (sorted) as one array in the stored dtype."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), *self.row_shape), dtype=self.dtype)
        for positions, rows in self._in_order(index):
            out[positions] = rows
        return out

    def _in_order(self, index: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return iter_sorted_rows(self.dataset, index, self.chunk_rows)

    def _shuffled(
        self, index: np.ndarray, rng: np.random.RandomState
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        starts = np.arange(0, len(index), self.block_rows)
        per_chunk = max(1, self.chunk_rows // self.block_rows)
        n_chunks = -(-len(starts) // per_chunk)
        # blocks spread evenly over the chunks: no short trailing chunk
        for part in np.array_split(rng.permutation(len(starts)), n_chunks):
            blocks = np.sort(starts[part])
            positions = np.concatenate(
                [np.arange(b, min(b + self.block_rows, len(index))) for b in blocks]
            )
            # rows land directly at shuffled places, so no second copy of the chunk is made
            slots = rng.permutation(len(positions))
            out = np.empty((len(positions), *self.row_shape), dtype=self.dtype)
            filled = 0
            for b in blocks:
                part = index[b : b + self.block_rows]
                out[slots[filled : filled + len(part)]] = self._read_sorted(part)
                filled += len(part)
            shuffled = np.empty_like(positions)
            shuffled[slots] = positions
            yield shuffled, out

    def _read_sorted(self, part: np.ndarray) -> np.ndarray:
        """A few sorted rows: one slice when consecutive, else a point selection."""
        lo, hi = int(part[0]), int(part[-1]) + 1
        return self.dataset[lo:hi] if hi - lo == len(part) else self.dataset[part]


class ConcatRows:
    """The rows of several layers of one store side by side: each row is every layer's row
    flattened and concatenated (in the given order), so one 2-D array carries them all; a
    `featx.classify.registry.ConcatLayers` step splits it again by `row_shapes`. Reads in
    order only (`iter` without `rng`, `read`), in chunks of about `chunk_bytes` in all."""

    def __init__(
        self, store: FeatureStore, keys: list[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.parts = [LayerRows(store, key, chunk_bytes) for key in keys]
        self.key = LAYER_JOIN.join(part.key for part in self.parts)
        self.row_shapes = [part.row_shape for part in self.parts]
        self.row_shape: tuple[int, ...] = (sum(int(np.prod(s)) for s in self.row_shapes),)
        self.dtype = np.result_type(*(part.dtype for part in self.parts))
        self.row_bytes = max(1, self.row_shape[0] * 4)
        self.chunk_rows = max(1, chunk_bytes // self.row_bytes)
        for part in self.parts:
            part.chunk_rows = self.chunk_rows

    def close(self) -> None:
        for part in self.parts:
            part.close()

    def __enter__(self) -> ConcatRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def nbytes(self, n_rows: int) -> int:
        """float32 bytes of `n_rows` rows."""
        return n_rows * self.row_bytes

    def iter(
        self, index: np.ndarray, rng: np.random.RandomState | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (positions, rows) with rows the concatenated rows `index[positions]`, in
        order; `index` must be sorted."""
        if rng is not None:
            raise ValueError("rows of several layers are read in order only.")
        index = np.asarray(index, dtype=np.int64)
        for start in range(0, len(index), self.chunk_rows):
            positions = np.arange(start, min(start + self.chunk_rows, len(index)))
            yield positions, self.read(index[positions])

    def read(self, index: np.ndarray) -> np.ndarray:
        """The concatenated rows `index` (sorted) as one 2-D array."""
        return np.concatenate(
            [part.read(index).reshape(len(index), -1).astype(self.dtype) for part in self.parts],
            axis=1,
        )


def open_rows(
    store: FeatureStore, key: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> LayerRows | ConcatRows:
    """`LayerRows` for one layer key, `ConcatRows` for `+`-joined keys (`blocks.4+bn2`)."""
    keys = key.split(LAYER_JOIN)
    if len(keys) == 1:
        return LayerRows(store, key, chunk_bytes)
    return ConcatRows(store, keys, chunk_bytes)
