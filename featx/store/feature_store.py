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
the shard files in place; its meta lists them as `virtual_sources: [{path, n_rows, identity}]`.
Any other reference to another file (external storage, links, virtual datasets) is refused on
open (`featx.store.sources`).

`<key>` is the layer name, with `@avg`, `@max` or `@avgmax` appended when the layer was pooled.

`FeatureStore` validates this structure once, when it opens a file (`validate_store`), and
names the first problem in one sentence; non-finite feature values are found by
`FeatureStore.check_finite`, which scans a layer (fit and evaluate call it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import h5py
import numpy as np

from featx.data.preprocessing import Preprocessing
from featx.errors import UsageError
from featx.runtime import human_size
from featx.store.sources import check_virtual_sources, walk_store

__all__ = [
    "FeatureStore",
    "LayerSummary",
    "add_layer",
    "iter_sorted_rows",
    "layer_key",
    "validate_store",
    "write_store",
]

FORMAT = "featx-store"
FORMAT_VERSION = 1
STR = h5py.string_dtype()
LAYER_JOIN = "+"  # `a+b`: several layers read as one, concatenated per row
SPLIT_NAMES = ("train", "validation", "test", "unsplit")
META_FIELDS = ("backbone", "weights", "weights_sha256", "preprocessing", "dataset")
DATASET_FIELDS = ("root", "fingerprint", "n_files")
# group -> {dataset: kind}: "str" text, "int" integers
COLUMNS = {
    "rows": {"path": "str", "label": "int", "split": "str", "source": "int", "view": "int"},
    "files": {"path": "str", "label": "int", "split": "str", "size": "int", "mtime_ns": "int"},
    "skipped": {"path": "str", "reason": "str"},
}


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
            self.meta: dict[str, Any]
            self.class_names: list[str]
            self.splits_: np.ndarray
            virtual = walk_store(self._file, self.path)
            self.meta, self.class_names, self.splits_ = validate_store(self._file, self.path)
            check_virtual_sources(self.path, virtual, self.meta)
        except UsageError:
            self._file.close()
            raise
        except Exception as error:  # h5py's errors on damaged objects (OSError, KeyError...)
            self._file.close()
            raise UsageError(
                f"store {self.path} is damaged ({type(error).__name__}: {error})."
            ) from None

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
        """The rows `index` (sorted row numbers) of a layer, as one array in the stored dtype,
        read in chunks of about 64 MB."""
        ds = self._file["features"][self.resolve(layer)]
        index = np.asarray(index, dtype=np.int64)
        row_bytes = max(1, int(np.prod(ds.shape[1:])) * 4)
        out = np.empty((len(index), *ds.shape[1:]), dtype=ds.dtype)
        for positions, rows in iter_sorted_rows(ds, index, max(1, (64 << 20) // row_bytes)):
            out[positions] = rows
        return out

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

    def check_finite(
        self, layer: str, split: str | None = None, chunk_bytes: int = 64 << 20
    ) -> None:
        """UsageError naming the first row of `layer` (all rows, or one split) that holds a
        NaN or infinite value; scans the layer in chunks of about `chunk_bytes`. A `+`-joined
        key checks each of its layers."""
        if LAYER_JOIN in layer:
            for part in layer.split(LAYER_JOIN):
                self.check_finite(part, split, chunk_bytes)
            return
        key = self.resolve(layer)
        ds = self._file["features"][key]
        index = np.arange(self.n_rows)[self.rows(split)]
        row_bytes = max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize)
        chunk_rows = max(1, chunk_bytes // row_bytes)
        for start in range(0, len(index), chunk_rows):
            part = index[start : start + chunk_rows]
            contiguous = part[-1] - part[0] + 1 == len(part)
            block = ds[int(part[0]) : int(part[-1]) + 1] if contiguous else ds[part]
            finite = np.isfinite(block.reshape(len(part), -1)).all(axis=1)
            if not finite.all():
                row = int(part[np.argmin(finite)])
                path = self._file["rows"]["path"].asstr()[row]
                raise UsageError(
                    f"layer {key} of store {self.path} has non-finite values (first at row "
                    f"{row}, image {path})."
                )

    # ---- summary ------------------------------------------------------------------------
    def summary(self) -> str:
        """A human-readable description: layers, rows per split and class, skipped, provenance."""
        m = self.meta
        versions = m.get("versions") if isinstance(m.get("versions"), dict) else {}
        lines = [
            f"store       {self.path}  ({human_size(self.path.stat().st_size)})",
            f"backbone    {m['backbone']}",
            f"weights     {m['weights']}  sha256 {m['weights_sha256'][:16]}",
            f"preprocess  {m.get('preprocessing_text')}",
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
            f"created     {m.get('created')}  featx {versions.get('featx')}, "
            f"torch {versions.get('torch')}"
        )
        lines.append("")
        lines.append(f"layers ({len(self.layers)}):")
        for key in self.layers:
            info = self.layer(key)
            virtual = self._file["features"][key].is_virtual
            size = "virtual" if virtual else human_size(info.nbytes)
            lines.append(
                f"  {key:<28} {'x'.join(map(str, info.shape)):<14} {info.dtype:<8} "
                f"{size:>9}  {_computed(info.attrs)}"
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
        for event in m.get("history") or []:
            if isinstance(event, dict):
                lines.append(f"  {event.get('time')}  {event.get('command')}")
        return "\n".join(lines)


def iter_sorted_rows(
    ds: h5py.Dataset, index: np.ndarray, chunk_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (positions, rows) with rows == ds[index[positions]] for sorted `index`, each one
    contiguous read spanning at most `chunk_rows` rows."""
    i = 0
    while i < len(index):
        start = int(index[i])
        j = int(np.searchsorted(index, start + chunk_rows, side="left"))
        block = ds[start : int(index[j - 1]) + 1]
        yield np.arange(i, j), block[index[i:j] - start]
        i = j


def _computed(attrs: Mapping[str, Any]) -> str:
    """How a layer was computed, from its attributes: precision, engine, batch size and int8's
    calibration."""
    text = " ".join(str(attrs[k]) for k in ("precision", "engine") if k in attrs)
    if "calibration_images" in attrs:
        text += (
            f", calibrated on {attrs['calibration_images']} images (seed "
            f"{attrs.get('calibration_seed')}), cosine to fp32 min "
            f"{attrs.get('calibration_cosine_min', float('nan')):.4f}"
        )
    if "batch_size" in attrs:
        text += f", batch {attrs['batch_size']}"
    return text


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _validated_meta(f: h5py.File, where: str, fail: Callable[[str], NoReturn]) -> dict[str, Any]:
    """The store's meta attribute, checked: a JSON object with the META_FIELDS of the right
    kinds; `fail(problem)` otherwise."""
    if "meta" not in f.attrs:
        fail("has no meta attribute")
    try:
        meta = json.loads(_text(f.attrs["meta"]))
    except (TypeError, ValueError):
        fail("has a meta attribute that is not JSON")
    if not isinstance(meta, dict):
        fail("has a meta attribute that is not a JSON object")
    for key in META_FIELDS:
        if key not in meta:
            fail(f"lacks meta field {key}")
    for key in ("backbone", "weights", "weights_sha256"):
        if not isinstance(meta[key], str):
            fail(f"has a meta field {key} that is not text")
    if not isinstance(meta["preprocessing"], dict):
        fail("has a meta field preprocessing that is not a JSON object")
    Preprocessing.from_dict(meta["preprocessing"], f"the meta field preprocessing of {where}")
    if not isinstance(meta["dataset"], dict):
        fail("has a meta field dataset that is not a JSON object")
    for key in DATASET_FIELDS:
        if key not in meta["dataset"]:
            fail(f"lacks meta field dataset.{key}")
    return meta


def _check_layers(features: h5py.Group, n_rows: int, fail: Callable[[str], NoReturn]) -> None:
    """Each layer of /features is a dataset of float16 or float32 rows, one per row of /rows."""
    for key, obj in features.items():
        if not isinstance(obj, h5py.Dataset):
            fail(f"has a group where the dataset /features/{key} should be")
        if obj.ndim < 2 or obj.dtype not in (np.float16, np.float32):
            shape = "x".join(map(str, obj.shape)) or "scalar"
            fail(
                f"has a layer {key} of shape {shape} and type {obj.dtype}, not rows of float16 "
                "or float32 features"
            )
        if obj.shape[0] != n_rows:
            fail(f"has {obj.shape[0]} rows in layer {key} but {n_rows} in /rows")


def validate_store(f: h5py.File, path: Path) -> tuple[dict[str, Any], list[str], np.ndarray]:
    """(meta, class names, split of every row) of an open store file, after checking its
    structure: format attributes, meta, groups and datasets of the right kind, dtype and rank,
    one row count everywhere, labels within the classes, known splits. UsageError naming the
    first problem otherwise."""
    where = f"store {path}"

    def fail(problem: str) -> NoReturn:
        raise UsageError(f"{where} {problem}.")

    if _text(f.attrs.get("featx_format")) != FORMAT:
        raise UsageError(f"{path} is not a featx feature store (no featx_format attribute).")
    version = f.attrs.get("format_version")
    if version is None:
        fail("has no format_version attribute")
    if not isinstance(version, int | np.integer) or version < 1:
        fail(f"has an unknown format version {_text(version)!r}")
    if version > FORMAT_VERSION:
        raise UsageError(
            f"{where} was written by a newer featx (store format {int(version)}); "
            "upgrade featx to read it."
        )

    meta = _validated_meta(f, where, fail)

    def dataset(name: str, kind: str) -> h5py.Dataset:
        obj = f.get(name)
        if obj is None:
            fail(f"has no /{name} dataset")
        if not isinstance(obj, h5py.Dataset):
            fail(f"has a group where the dataset /{name} should be")
        is_text = h5py.check_string_dtype(obj.dtype) is not None or obj.dtype.kind in "SO"
        if (
            obj.ndim != 1
            or (kind == "str" and not is_text)
            or (kind == "int" and obj.dtype.kind not in "iu")
        ):
            shape = "x".join(map(str, obj.shape)) or "scalar"
            fail(f"has a /{name} of shape {shape} and type {obj.dtype}, not a list of {kind}")
        return obj

    def group(name: str) -> h5py.Group:
        obj = f.get(name)
        if obj is None:
            fail(f"has no /{name} group")
        if not isinstance(obj, h5py.Group):
            fail(f"has a dataset where the group /{name} should be")
        return obj

    class_names = list(_strings(dataset("classes", "str")))
    lengths = {}
    for name, columns in COLUMNS.items():
        group(name)
        for column, kind in columns.items():
            lengths[f"{name}/{column}"] = len(dataset(f"{name}/{column}", kind))
    for name in COLUMNS:
        counts = {k: n for k, n in lengths.items() if k.startswith(f"{name}/")}
        if len(set(counts.values())) > 1:
            first = next(iter(counts))
            other = next(k for k, n in counts.items() if n != counts[first])
            fail(f"has {counts[other]} entries in /{other} but {counts[first]} in /{first}")
    n_rows = lengths["rows/path"]

    _check_layers(group("features"), n_rows, fail)
    labels = f["rows/label"][()]
    if not class_names:
        fail("has no classes (/classes is empty)")
    bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if len(bad):
        fail(
            f"has a label {int(labels[bad[0]])} at row {int(bad[0])}, outside the "
            f"{len(class_names)} classes"
        )
    splits = _strings(f["rows/split"])
    unknown = sorted(set(splits) - set(SPLIT_NAMES))
    if unknown:
        fail(f"has rows of an unknown split {unknown[0]!r} (known: {', '.join(SPLIT_NAMES)})")
    return meta, class_names, splits


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
