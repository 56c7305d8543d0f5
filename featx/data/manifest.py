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
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.data.folders import (
    SPLIT_DIRS,
    SPLIT_ORDER,
    UNSPLIT,
    ImageFile,
    ImageFolder,
    scan_image_folder,
)
from featx.data.manifest_checks import (
    check_cells,
    check_duplicates,
    clean_columns,
    metadata_values,
    shown,
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
REQUIRED = ("path", "label")


def is_manifest(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in MANIFEST_SUFFIXES


def open_dataset(path: str | os.PathLike) -> ImageFolder:
    """The dataset at `path`: tar shards, Parquet files of image bytes or a saved Hugging Face
    dataset (`featx.data.sources`), a manifest (.csv, .tsv, .parquet; URLs read through
    fsspec) or an image folder."""
    packed = open_source(path)
    if packed is not None:
        return packed
    if not is_manifest(path):
        return scan_image_folder(path)
    listed = read_manifest(path)
    urls = any("://" in p for p in listed.files.column("path"))
    return with_urls(listed, path) if urls else listed  # without: no file stat()ed here


def _read_columns(path: Path) -> list[tuple[str, list]]:
    """The manifest's columns, (name, values) in header order (str for CSV/TSV, typed for
    Parquet)."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_table(path).to_pydict().items())
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
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


def read_manifest(path: str | os.PathLike) -> ImageFolder:
    """List the images of a manifest; UsageError if it is missing, empty or malformed."""
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
    columns = clean_columns(path, _read_columns(path))
    if not columns:
        raise UsageError(f"manifest {path} is empty: it lists no images.")
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        raise UsageError(
            f"manifest {path} has no {' or '.join(missing)} column; it needs path and label "
            "(and optionally split)."
        )
    n = len(columns["path"])
    if n == 0:
        raise UsageError(f"manifest {path} lists no images.")
    check_cells(path, columns["path"], columns["label"])
    root = path.parent
    base = str(root.resolve())
    paths = _relative_paths(columns["path"], base, path)
    labels = [str(v).strip() for v in columns["label"]]
    if "" in labels:
        raise UsageError(
            f"manifest {path} has a row with an empty label ({shown(paths[labels.index('')])})."
        )
    if "split" in columns:
        splits = []
        texts = [str(v) for v in columns["split"]]
        named = {t: SPLIT_DIRS.get(t.strip().lower()) for t in set(texts)}
        for value, text, image in zip(columns["split"], texts, paths, strict=True):
            split = named[text]
            if split is None:
                raise UsageError(
                    f"manifest {path} gives {shown(image)} the unknown split {value!r}; use train, "
                    "validation (or val) or test."
                )
            splits.append(split)
    else:
        splits = [UNSPLIT] * n
    if _may_repeat(paths, base):
        check_duplicates(path, base, paths)

    class_names = sorted(set(labels))
    label_of = {name: i for i, name in enumerate(class_names)}
    codes = np.array([label_of[label] for label in labels], dtype=np.int32)
    order = _store_order(paths, codes, splits, len(class_names))
    files = ManifestFiles(
        base,
        np.array(paths, dtype=object)[order],
        codes[order],
        np.array(splits, dtype=object)[order],
    )
    rows = order.tolist()
    meta = {
        name: metadata_values([values[i] for i in rows])
        for name, values in columns.items()
        if name not in (*REQUIRED, "split")
    }
    return ManifestFolder(root, tuple(class_names), files, meta=meta, digest=_digest(path))


def _store_order(paths: list[str], codes: np.ndarray, splits: list[str], n_classes: int):
    """The rows' indices in split, class, path order (a sort by path, then a stable sort by
    split and class: no Python tuple per row)."""
    by_path = np.array(sorted(range(len(paths)), key=paths.__getitem__), dtype=np.int64)
    split_codes = np.array([SPLIT_ORDER[s] for s in splits], dtype=np.int64)
    group = (split_codes * n_classes + codes)[by_path]
    return by_path[np.argsort(group, kind="stable")]


def _digest(path: Path) -> str:
    """sha256 of the manifest's bytes: the dataset's identity, whatever its size."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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

    @property
    def fingerprint(self) -> str:
        return self.digest


def _relative_paths(values: list, root: str, manifest: Path) -> list[str]:
    """The manifest's paths as stored (see `_relative`). When every path is already a
    relative, normalised path (the common case), one pass over the joined text shows it."""
    paths = [str(v).strip() for v in values]
    joined = "\0" + "\0".join(paths) + "\0"  # check_cells refused NUL bytes in paths
    if os.sep == "/" and not any(
        mark in joined for mark in ("\0\0", "\0/", "\0.", "//", "/.", "/\0", "://")
    ):
        return paths
    return [_relative(p, root, manifest) for p in paths]


def _relative(image: str, root: str, manifest: Path) -> str:
    """A manifest path as stored: relative to the manifest's folder when below it.
    (String functions, not pathlib: this runs once per image of possibly millions.)"""
    if not image:
        raise UsageError(f"manifest {manifest} has a row with an empty path.")
    if "://" in image:  # a URL, read through fsspec (featx.data.sources.urls)
        return image
    if os.sep == "/" and not (  # already as normpath gives it
        "//" in image or "/." in image or image[0] == "." or image[-1] == "/"
    ):
        if image[0] != "/":
            return image
        if image.startswith(root + "/"):
            return image[len(root) + 1 :]
    image = os.path.normpath(image)
    if os.path.isabs(image):
        inside = os.path.relpath(image, root)
        return image if inside.startswith("..") else inside
    return image


def _may_repeat(paths: list[str], base: str) -> bool:
    """False when no two rows can name one file: no path is listed twice and no two of their
    folders, as spelled, are one folder on disk (one realpath per folder, not per row)."""
    if len(set(paths)) != len(paths):
        return True
    folders = {image.rpartition("/")[0] for image in paths}
    real = {os.path.realpath(os.path.join(base, folder)) for folder in folders}
    return len(real) != len(folders)


def _stat(file: str) -> tuple[int, int]:
    """(size, mtime_ns), or (-1, 0) for a missing file, which extraction then skips."""
    try:
        st = os.stat(file)
    except OSError:
        return -1, 0
    return st.st_size, st.st_mtime_ns
