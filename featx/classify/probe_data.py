"""The rows a probe reads from one stored layer: the training, validation and test parts, as
vectors (a stored spatial map pooled), with their labels.

In memory, the layer is read once, its parts laid out one after the other (train, validation,
test) in one tensor on the device, so that "train" and "train + validation" are views, not
copies. Out of core (the parts would not fit the memory budget), only the validation and test
rows are held; the training rows are read from the store in chunks every time the solver
needs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from featx.classify.pipeline import LayerFeatures
from featx.store.feature_store import FeatureStore
from featx.store.rows import LayerRows

__all__ = ["PARTS", "SMALL_FLOAT64", "LayerSource", "RowPart"]

PARTS = ("train", "validation", "test")
SMALL_FLOAT64 = 1 << 25  # values (rows x features) up to which the solver works in float64


@dataclass
class RowPart:
    """Store rows (sorted), their labels, and where they are in the in-memory tensor."""

    rows: np.ndarray
    labels: torch.Tensor
    start: int = 0  # in memory: the first position of this part


@dataclass
class LayerSource:
    """One layer's rows for a probe; make with `LayerSource.open`, close when done."""

    key: str
    pool: str
    device: torch.device
    dtype: torch.dtype
    parts: dict[str, RowPart]
    n_features: int
    streamed: bool
    chunk_bytes: int
    memory_bytes: int  # what the rows held in memory take
    budget: int  # the memory the probe may use for this layer
    X: torch.Tensor | None = None  # in memory: every part, one after the other
    held: dict[str, torch.Tensor] = field(default_factory=dict)  # streamed: validation, test
    rows: LayerRows | None = None

    @classmethod
    def open(
        cls,
        store: FeatureStore,
        key: str,
        index: dict[str, np.ndarray],
        labels: np.ndarray,
        *,
        pool: str,
        device: torch.device,
        budget: int,
        chunk_bytes: int,
        stream: bool | None = None,
    ) -> LayerSource:
        """Read `index` (part name -> sorted store rows) of layer `key`: in memory unless its
        float32 values exceed `budget` bytes (or `stream` says otherwise)."""
        rows = LayerRows(store, key, chunk_bytes)
        spatial = len(rows.row_shape) == 3
        pool = pool if spatial else "none"
        width = LayerFeatures(pool).fit(np.zeros((1, *rows.row_shape), np.float32))
        n_features = width.n_features_out_
        n_rows = sum(len(i) for i in index.values())
        streamed = stream if stream is not None else n_rows * n_features * 4 > budget
        small = n_rows * n_features <= SMALL_FLOAT64 and not streamed
        source = cls(
            key=rows.key,
            pool=pool,
            device=device,
            dtype=torch.float64 if small else torch.float32,
            parts={},
            n_features=n_features,
            streamed=streamed,
            chunk_bytes=chunk_bytes,
            memory_bytes=0,
            budget=budget,
            rows=rows,
        )
        start = 0
        for name, part in index.items():
            y = torch.as_tensor(labels[part], dtype=torch.long, device=device)
            source.parts[name] = RowPart(np.asarray(part, dtype=np.int64), y, start)
            start += len(part)
        if streamed:
            for name in ("validation", "test"):
                if name in index:
                    source.held[name] = source._read(source.parts[name].rows)
            source.memory_bytes = sum(t.nbytes for t in source.held.values()) + chunk_bytes * 2
        else:
            source.X = torch.cat([source._read(source.parts[n].rows) for n in index])
            source.memory_bytes = source.X.nbytes
            rows.close()
            source.rows = None
        return source

    def close(self) -> None:
        if self.rows is not None:
            self.rows.close()
        self.X = None
        self.held.clear()

    def _pooled(self, chunk: np.ndarray) -> np.ndarray:
        return LayerFeatures(self.pool).fit_transform(chunk)

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        out = np.empty((len(rows), self.n_features), dtype=np.float32)
        for positions, chunk in self.rows.iter(rows):
            out[positions] = self._pooled(chunk)
        return torch.from_numpy(out).to(self.device, self.dtype)

    def can_copy(self, n_rows: int) -> bool:
        """Whether a copy of `n_rows` rows (the solver's standardised training rows) fits the
        budget beside the rows held."""
        copy = n_rows * self.n_features * torch.finfo(self.dtype).bits // 8
        return not self.streamed and self.memory_bytes + copy <= self.budget

    # ---- access --------------------------------------------------------------------------
    def labels(self, *names: str) -> torch.Tensor:
        return torch.cat([self.parts[n].labels for n in names])

    def features(self, name: str) -> torch.Tensor:
        """All rows of a held part (validation or test; any part in memory)."""
        if self.X is None:
            return self.held[name]
        part = self.parts[name]
        return self.X[part.start : part.start + len(part.rows)]

    def chunks(
        self, names: tuple[str, ...], subset: np.ndarray | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, labels) of the parts `names` (consecutive in memory), or of `subset`
        (positions into the first part), in blocks."""
        if subset is not None:
            part = self.parts[names[0]]
            yield from self._rows_of(names[0], part.rows[subset], part.labels[subset], subset)
            return
        if self.X is not None and list(names) == list(self.parts)[: len(names)]:
            n = sum(len(self.parts[name].rows) for name in names)
            yield self.X[:n], self.labels(*names)
            return
        for name in names:
            part = self.parts[name]
            yield from self._rows_of(name, part.rows, part.labels, None)

    def _rows_of(
        self, name: str, rows: np.ndarray, labels: torch.Tensor, subset: np.ndarray | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.X is not None:
            part = self.parts[name]
            positions = np.arange(len(part.rows)) if subset is None else subset
            yield self.X[part.start + torch.as_tensor(positions, device=self.device)], labels
        elif name in self.held:
            held = self.held[name]
            yield (held if subset is None else held[torch.as_tensor(subset)]), labels
        else:
            for positions, chunk in self.rows.iter(rows):
                X = torch.from_numpy(self._pooled(chunk)).to(self.device, self.dtype)
                yield X, labels[torch.as_tensor(positions, device=labels.device)]
