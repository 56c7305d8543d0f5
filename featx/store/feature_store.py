"""The HDF5 feature store: layout, reading, and the summary `featx info` prints.

Layout (format version 1), readable with plain h5py:

    /                   attrs: featx_format="featx-store", format_version=1, meta=<JSON text>
    /classes            (n_classes,) str          class names; labels index into this
    /rows/path          (rows,) str               image path relative to the dataset root
    /rows/label         (rows,) int32             class index
    /rows/split         (rows,) str               train | validation | test | unsplit
    /rows/source        (rows,) int64             index of the source image in /files
    /rows/view          (rows,) int32             0 for the original, 1..K for augmented views
    /rows/meta/<column> (rows,) str|int64|float64 a manifest's extra columns (absent for folders)
    /features/<key>     (rows, ...) float32|16    one dataset per layer, chunked by rows
                        attrs: layer, module, pool, precision
    /files/{path,label,split,size,mtime_ns}       every image file of the dataset when extracted
    /skipped/{path,reason}                        files that could not be decoded

A store made by `featx extract --shard I/N` holds the rows of its slice only, with the whole
dataset's /files; its meta has `shard: {index, count, first_row, n_rows, n_rows_total, ...}`.
A store made by `featx merge --virtual` holds HDF5 virtual datasets under /features that read
the shard files in place.

`<key>` is the layer name, with `@avg`, `@max` or `@avgmax` appended when the layer was pooled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx.errors import UsageError
from featx.runtime import human_size

FORMAT = "featx-store"
FORMAT_VERSION = 1
STR = h5py.string_dtype()


def layer_key(layer: str, pool: str) -> str:
    """The dataset name of a layer under /features."""
    return layer if pool == "none" else f"{layer}@{pool}"


def _strings(dataset: h5py.Dataset) -> np.ndarray:
    return dataset.asstr()[()] if len(dataset) else np.array([], dtype=object)


@dataclass(frozen=True)
class LayerSummary:
    key: str
    shape: tuple[int, ...]  # per row
    dtype: str
    nbytes: int
    attrs: dict[str, Any]


class FeatureStore:
    """Read access to a feature store.

    >>> store = FeatureStore("stores/flowers-vgg16-default-224.h5")
    >>> X = store.read("block4_pool", split="train")
    >>> y = store.labels(split="train")
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise UsageError(f"{self.path} is a folder; give the path of a store file (.h5).")
        if not self.path.is_file():
            raise UsageError(f"store {self.path} does not exist.")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            raise UsageError(f"{self.path} is not a readable HDF5 file ({error}).") from None
        try:
            if self._file.attrs.get("featx_format") != FORMAT:
                raise ValueError("no featx_format attribute")
            self.meta: dict[str, Any] = json.loads(self._file.attrs["meta"])
            self.class_names: list[str] = list(_strings(self._file["classes"]))
            self.splits_: np.ndarray = _strings(self._file["rows"]["split"])
        except (KeyError, ValueError) as error:
            self._file.close()
            raise UsageError(f"{self.path} is not a featx feature store ({error}).") from None

    # ---- context management -------------------------------------------------------------
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, rows={self.n_rows}, layers={self.layers})"

    # ---- what is inside -----------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return len(self.splits_)

    @property
    def layers(self) -> list[str]:
        return sorted(self._file["features"]) if "features" in self._file else []

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.splits_))

    def layer(self, key: str) -> LayerSummary:
        ds = self._file["features"][self.resolve(key)]
        return LayerSummary(
            key=ds.name.rsplit("/", 1)[-1],
            shape=tuple(ds.shape[1:]),
            dtype=str(ds.dtype),
            nbytes=int(ds.id.get_storage_size()),
            attrs=dict(ds.attrs),
        )

    def resolve(self, key: str) -> str:
        """The dataset name for a layer key or module path; UsageError listing what is there."""
        if key in self.layers:
            return key
        for name in self.layers:
            if self._file["features"][name].attrs.get("module") == key:
                return name
        have = ", ".join(self.layers) or "none"
        raise UsageError(f"store {self.path} has no layer {key!r}; it has: {have}.")

    @property
    def skipped(self) -> list[tuple[str, str]]:
        group = self._file["skipped"]
        return list(zip(_strings(group["path"]), _strings(group["reason"]), strict=True))

    # ---- rows ---------------------------------------------------------------------------
    def rows(self, split: str | None = None) -> np.ndarray | slice:
        """Row indices of a split (a slice when contiguous), or all rows."""
        if split is None:
            return slice(0, self.n_rows)
        if split not in self.splits:
            raise UsageError(
                f"store {self.path} has no {split!r} rows; it has: {', '.join(self.splits)}."
            )
        index = np.flatnonzero(self.splits_ == split)
        if index[-1] - index[0] + 1 == len(index):
            return slice(int(index[0]), int(index[-1]) + 1)
        return index

    def _column(self, name: str, split: str | None) -> np.ndarray:
        ds = self._file["rows"][name]
        values = ds.asstr()[()] if ds.dtype == STR or ds.dtype.kind == "O" else ds[()]
        return values[self.rows(split)]

    def labels(self, split: str | None = None) -> np.ndarray:
        return self._column("label", split)

    def paths(self, split: str | None = None) -> np.ndarray:
        return self._column("path", split)

    def sources(self, split: str | None = None) -> np.ndarray:
        return self._column("source", split)

    def views(self, split: str | None = None) -> np.ndarray:
        return self._column("view", split)

    @property
    def row_meta_columns(self) -> list[str]:
        """The names of the per-row metadata columns (a manifest's extra columns)."""
        group = self._file["rows"].get("meta")
        return sorted(group) if group is not None else []

    def row_meta(self, name: str, split: str | None = None) -> np.ndarray:
        """A manifest's extra column `name`, one value per row (of a split)."""
        if name not in self.row_meta_columns:
            have = ", ".join(self.row_meta_columns) or "none"
            raise UsageError(f"store {self.path} has no row metadata {name!r}; it has: {have}.")
        return self._column(f"meta/{name}", split)

    def split_of_rows(self, split: str | None = None) -> np.ndarray:
        return self.splits_[self.rows(split)]

    # ---- features -----------------------------------------------------------------------
    def read(self, layer: str, split: str | None = None) -> np.ndarray:
        """A layer's features for all rows or one split, as one array."""
        return self._file["features"][self.resolve(layer)][self.rows(split)]

    def iter_chunks(
        self, layer: str, split: str | None = None, chunk_rows: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (features, labels) in row chunks of at most `chunk_rows` (default: ~64 MB)."""
        ds = self._file["features"][self.resolve(layer)]
        if chunk_rows is None:
            row_bytes = max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize)
            chunk_rows = max(1, (64 << 20) // row_bytes)
        rows = self.rows(split)
        index = np.arange(self.n_rows)[rows]
        labels = self._file["rows"]["label"]
        for start in range(0, len(index), chunk_rows):
            part = index[start : start + chunk_rows]
            sel = (
                slice(int(part[0]), int(part[-1]) + 1)
                if part[-1] - part[0] + 1 == len(part)
                else part
            )
            yield ds[sel], labels[sel]

    def read_rows(self, layer: str, index: np.ndarray) -> np.ndarray:
        """The rows `index` (sorted row numbers) of a layer, as one array in the stored dtype."""
        from featx.store.rows import LayerRows

        with LayerRows(self, layer) as rows:
            return rows.read(index)

    def copy_layer(self, key: str, out: h5py.File) -> None:
        """Copy layer `key`, with its attributes and chunking, into the store file `out`."""
        self._file.copy(self._file["features"][self.resolve(key)], out["features"], name=key)

    def files(self) -> dict[str, tuple[int, int]]:
        """The dataset's files at extraction time: relative path -> (size, mtime_ns)."""
        g = self._file["files"]
        return {
            p: (int(size), int(mtime))
            for p, size, mtime in zip(
                _strings(g["path"]), g["size"][()], g["mtime_ns"][()], strict=True
            )
        }

    # ---- summary ------------------------------------------------------------------------
    def summary(self) -> str:
        """A human-readable description: layers, rows per split and class, skipped, provenance."""
        m = self.meta
        lines = [
            f"store       {self.path}  ({human_size(self.path.stat().st_size)})",
            f"backbone    {m['backbone']}",
            f"weights     {m['weights']}  sha256 {m['weights_sha256'][:16]}",
            f"preprocess  {m['preprocessing_text']}",
            f"dataset     {m['dataset']['root']}  ({m['dataset']['n_files']} files, "
            f"fingerprint {m['dataset']['fingerprint'][:16]})",
        ]
        if m.get("augment"):
            lines.append(
                f"augment     {m['augment']['views']} views per training image, "
                f"seed {m['augment']['seed']}"
            )
        if m.get("shard"):
            shard = m["shard"]
            lines.append(
                f"shard       {shard['index']} of {shard['count']}: rows from "
                f"{shard['first_row']} of {shard['n_rows_total']} (join with `featx merge`)"
            )
        lines.append(
            f"created     {m['created']}  featx {m['versions'].get('featx')}, "
            f"torch {m['versions'].get('torch')}"
        )
        lines.append("")
        lines.append(f"layers ({len(self.layers)}):")
        for key in self.layers:
            info = self.layer(key)
            virtual = self._file["features"][key].is_virtual
            size = "virtual" if virtual else human_size(info.nbytes)
            lines.append(
                f"  {key:<28} {'x'.join(map(str, info.shape)):<14} {info.dtype:<8} "
                f"{size:>9}  {info.attrs.get('precision', '')}"
            )
        lines.append("")
        labels = self._file["rows"]["label"][()]
        lines.append(f"rows: {self.n_rows}")
        header = "  " + f"{'class':<24}" + "".join(f"{s:>12}" for s in self.splits)
        lines.append(header)
        for label, name in enumerate(self.class_names):
            counts = [int(np.sum((labels == label) & (self.splits_ == s))) for s in self.splits]
            lines.append("  " + f"{name[:24]:<24}" + "".join(f"{c:>12}" for c in counts))
        skipped = self.skipped
        lines.append("")
        lines.append(f"skipped files: {len(skipped)}")
        for path, reason in skipped[:20]:
            lines.append(f"  {path}: {reason}")
        if len(skipped) > 20:
            lines.append(f"  ... and {len(skipped) - 20} more")
        lines.append("")
        lines.append("history:")
        for event in m.get("history", []):
            lines.append(f"  {event['time']}  {event['command']}")
        return "\n".join(lines)


def write_store(
    path: Path,
    meta: dict[str, Any],
    class_names: list[str],
    files: dict[str, np.ndarray],
    rows: dict[str, np.ndarray],
    skipped: list[tuple[str, str]],
) -> h5py.File:
    """Create a store file with everything but the features; the caller adds layers and closes."""
    out = h5py.File(path, "w")
    out.attrs["featx_format"] = FORMAT
    out.attrs["format_version"] = FORMAT_VERSION
    out.attrs["meta"] = json.dumps(meta, indent=1)
    out.create_dataset("classes", data=np.array(class_names, dtype=object), dtype=STR)
    for group, columns in (("files", files), ("rows", rows)):
        for name, values in columns.items():
            dtype = STR if values.dtype.kind in "OU" else values.dtype
            out.create_dataset(
                f"{group}/{name}",
                data=values.astype(object) if dtype is STR else values,
                dtype=dtype,
            )
    paths = np.array([p for p, _ in skipped], dtype=object)
    reasons = np.array([r for _, r in skipped], dtype=object)
    out.create_dataset("skipped/path", data=paths, dtype=STR, shape=(len(paths),))
    out.create_dataset("skipped/reason", data=reasons, dtype=STR, shape=(len(reasons),))
    out.create_group("features")
    return out


def add_layer(
    out: h5py.File,
    key: str,
    n_rows: int,
    row_shape: tuple[int, ...],
    dtype: str,
    compression: str,
    attrs: dict[str, Any],
    blocks: Iterator[np.ndarray],
) -> None:
    """Write one layer from consecutive row blocks, chunked by rows (about 1 MB a chunk)."""
    row_bytes = max(1, int(np.prod(row_shape)) * np.dtype(dtype).itemsize)
    chunk_rows = max(1, min(n_rows, (1 << 20) // row_bytes))
    ds = out.create_dataset(
        f"features/{key}",
        shape=(n_rows, *row_shape),
        dtype=dtype,
        chunks=(chunk_rows, *row_shape) if n_rows else None,
        compression=None if compression == "none" else compression,
        shuffle=compression == "gzip",
    )
    ds.attrs.update(attrs)
    start = 0
    for block in blocks:
        ds[start : start + len(block)] = block
        start += len(block)
    if start != n_rows:
        raise RuntimeError(f"layer {key}: wrote {start} rows, expected {n_rows}")
