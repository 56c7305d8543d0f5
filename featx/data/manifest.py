"""Manifests: a table of images (CSV, TSV or Parquet) instead of an image folder.

Columns: `path` (absolute, or relative to the manifest's folder), `label` (class name) and an
optional `split` (train, validation, val or test). Any other column is kept as per-row metadata.
A manifest lists the same `ImageFolder` as `scan_image_folder` would for the equivalent folder:
rows in split, class, path order, the same fingerprint (relative path, size, mtime), and files
that are missing or cannot be decoded are skipped at extraction, not refused here.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.data.folders import SPLIT_ORDER, UNSPLIT, ImageFile, ImageFolder, scan_image_folder
from featx.data.manifest_arrow import parse_arrow
from featx.data.manifest_cache import Parsed, load_parsed, save_parsed
from featx.data.manifest_checks import (
    REQUIRED,
    bytes_note,
    check_cells,
    check_duplicates,
    check_required,
    clean_columns,
    metadata_values,
    relative_path,
    shown,
    split_names,
)
from featx.data.sources import open_source, with_urls
from featx.errors import UsageError

__all__ = [
    "MANIFEST_SUFFIXES",
    "ManifestFiles",
    "ManifestFolder",
    "is_manifest",
    "open_dataset",
    "read_manifest",
]

MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet")
UNSTATED = -2  # a file's size before it is stat()ed (-1: missing)


def is_manifest(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in MANIFEST_SUFFIXES


def open_dataset(path: str | os.PathLike, labelled: bool = True) -> ImageFolder:
    """The dataset at `path`: tar shards, Parquet files of image bytes or a saved Hugging Face
    dataset (`featx.data.sources`), a manifest (.csv, .tsv, .parquet; URLs read through
    fsspec) or an image folder. Without `labelled` (images to classify), tar samples need no
    label."""
    packed = open_source(path, labelled)
    if packed is not None:
        return packed
    if not is_manifest(path):
        return scan_image_folder(path)
    listed = read_manifest(path)
    return with_urls(listed, path) if listed.urls else listed  # without: no file stat()ed here


def read_manifest(path: str | os.PathLike) -> ImageFolder:
    """List the images of a manifest; UsageError if it is missing, empty or malformed. A
    manifest read before (by another shard) is mapped from featx's cache
    (`featx.data.manifest_cache`); the check that no file is listed twice under two spellings
    of its folder runs every time, as the filesystem may have changed."""
    enabled = gc.isenabled()
    gc.disable()  # millions of short-lived rows: collections would find nothing to free
    try:
        return _read_manifest(Path(path))
    finally:
        if enabled:
            gc.enable()


def _read_manifest(path: Path) -> ImageFolder:
    if not path.is_file():
        raise UsageError(f"manifest {path} does not exist or is not a file.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UsageError(f"manifest {path} cannot be read ({error}).") from None
    digest = hashlib.sha256(data).hexdigest()  # the dataset's identity, whatever its size
    base = str(path.parent.resolve())
    parsed = load_parsed(digest, base)
    if parsed is None:
        parsed = parse_arrow(path, data, base) or _parse_rows(path, data, base)
        save_parsed(digest, base, parsed)
    real = {os.path.realpath(os.path.join(base, folder)) for folder in parsed.folders}
    if len(real) != len(parsed.folders):  # two folders, as spelled, are one on disk
        check_duplicates(path, base, parsed.paths.tolist())
    files = ManifestFiles(base, parsed.paths, parsed.labels, parsed.split_names())
    return ManifestFolder(
        path.parent,
        parsed.class_names,
        files,
        meta=parsed.meta,
        digest=digest,
        notes=parsed.notes,
        urls=parsed.urls,
    )


def _read_columns(path: Path, data: bytes) -> list[tuple[str, list]]:
    """The manifest's columns, (name, values) in header order (str for CSV/TSV, typed for
    Parquet), read row by row."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_table(io.BytesIO(data)).to_pydict().items())
        text = io.StringIO(data.decode("utf-8-sig"), newline="")
        reader = csv.reader(text, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = next(reader, None)
        if header is None:
            return []
        body = list(reader)
    except ImportError:
        raise UsageError(
            "reading a .parquet manifest needs pyarrow: pip install pyarrow."
        ) from None
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as error:
        raise UsageError(f"manifest {path} cannot be read ({error}).") from None
    header = [name.strip() for name in header]
    width = len(header)
    if not all(len(row) == width for row in body):
        for number, row in enumerate(body, start=2):
            if len(row) != width and any(cell.strip() for cell in row):
                raise UsageError(
                    f"manifest {path} line {number} has {len(row)} fields, not {width}."
                )
        body = [row for row in body if len(row) == width]
    columns = list(zip(*body, strict=True)) if body else [() for _ in header]
    return [(name, list(values)) for name, values in zip(header, columns, strict=True)]


def _parse_rows(path: Path, data: bytes, base: str) -> Parsed:
    """The manifest read row by row (without pyarrow, or input its columnar reader leaves
    to Python's csv module)."""
    columns = clean_columns(path, _read_columns(path, data))
    check_required(path, columns, len(columns.get("path", ())))
    check_cells(path, columns["path"], columns["label"])
    paths = _relative_paths(columns["path"], base, path)
    labels = [str(v).strip() for v in columns["label"]]
    if "" in labels:
        raise UsageError(
            f"manifest {path} has a row with an empty label ({shown(paths[labels.index('')])})."
        )
    n = len(paths)
    splits = split_names(path, columns["split"], paths) if "split" in columns else [UNSPLIT] * n
    if len(set(paths)) != n:
        check_duplicates(path, base, paths)
    class_names = sorted(set(labels))
    label_of = {name: i for i, name in enumerate(class_names)}
    codes = np.array([label_of[label] for label in labels], dtype=np.int32)
    split_codes = np.array([SPLIT_ORDER[s] for s in splits], dtype=np.int8)
    order = _store_order(paths, codes, split_codes, len(class_names))
    rows = order.tolist()
    meta, notes = {}, []
    for name, values in columns.items():
        if name in (*REQUIRED, "split"):
            continue
        if any(isinstance(v, bytes | bytearray) for v in values):
            notes.append(bytes_note(path, name))
            continue
        meta[name] = np.array(metadata_values([values[i] for i in rows]))
        if meta[name].dtype.kind == "U":
            meta[name] = meta[name].astype(object)
    return Parsed(
        tuple(class_names),
        np.array(paths, dtype=object)[order],
        codes[order],
        split_codes[order],
        meta,
        tuple({image.rpartition("/")[0] for image in paths}),
        tuple(notes),
        any("://" in image for image in paths),
    )


def _store_order(paths: list[str], codes: np.ndarray, splits: np.ndarray, n_classes: int):
    """The rows' indices in split, class, path order (a sort by path, then a stable sort by
    split and class: no Python tuple per row)."""
    by_path = np.array(sorted(range(len(paths)), key=paths.__getitem__), dtype=np.int64)
    group = (splits.astype(np.int64) * n_classes + codes)[by_path]
    return by_path[np.argsort(group, kind="stable")]


class ManifestFiles(Sequence):
    """A manifest's files in store order, as `ImageFile`s: each file is stat()ed when it is
    first read, so a shard stats only its own slice. `column(name)` gives the path, label or
    split of every file without stat()ing any."""

    def __init__(self, base: str, paths: np.ndarray, labels: np.ndarray, splits: np.ndarray):
        self.base, self.paths, self.labels, self.splits = base, paths, labels, splits
        self._size = np.full(len(paths), UNSTATED, dtype=np.int64)
        self._mtime = np.zeros(len(paths), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        index = range(len(self))[index]  # negative indices; IndexError past the end
        if self._size[index] == UNSTATED:
            self._size[index], self._mtime[index] = _stat(
                os.path.join(self.base, self.paths[index])
            )
        return ImageFile(
            self.paths[index],
            int(self.labels[index]),
            self.splits[index],
            int(self._size[index]),
            int(self._mtime[index]),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (Sequence, ManifestFiles)) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def stated(self) -> int:
        """How many of the files have been stat()ed so far."""
        return int(np.count_nonzero(self._size != UNSTATED))

    def column(self, name: str) -> np.ndarray:
        """`path`, `label` or `split` of every file, in order."""
        return {"path": self.paths, "label": self.labels, "split": self.splits}[name]


@dataclass(frozen=True)
class ManifestFolder(ImageFolder):
    """A manifest's dataset: its fingerprint is the sha256 of the manifest's bytes (no file
    is stat()ed for it); files changed in place are found by their recorded size and time."""

    digest: str = ""
    notes: tuple[str, ...] = field(default=(), compare=False)  # what was left out, and why
    urls: bool = False  # whether any row is a URL, read through fsspec

    @property
    def fingerprint(self) -> str:
        return self.digest


def _relative_paths(values: list, root: str, manifest: Path) -> list[str]:
    """The manifest's paths as stored (see `relative_path`). When every path is already a
    relative, normalised path (the common case), one pass over the joined text shows it."""
    paths = [str(v).strip() for v in values]
    joined = "\0" + "\0".join(paths) + "\0"  # check_cells refused NUL bytes in paths
    if os.sep == "/" and not any(
        mark in joined for mark in ("\0\0", "\0/", "\0.", "//", "/.", "/\0", "://")
    ):
        return paths
    return [relative_path(p, root, manifest) for p in paths]


def _stat(file: str) -> tuple[int, int]:
    """(size, mtime_ns), or (-1, 0) for a missing file, which extraction then skips."""
    try:
        st = os.stat(file)
    except OSError:
        return -1, 0
    return st.st_size, st.st_mtime_ns
