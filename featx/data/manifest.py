"""Manifests: a table of images (CSV, TSV or Parquet) instead of an image folder.

Columns: `path` (absolute, or relative to the manifest's folder), `label` (class name) and an
optional `split` (train, validation, val or test). Any other column is kept as per-row metadata.
A manifest lists the same `ImageFolder` as `scan_image_folder` would for the equivalent folder:
rows in split, class, path order, the same fingerprint (relative path, size, mtime), and files
that are missing or cannot be decoded are skipped at extraction, not refused here.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from featx.data.folders import (
    SPLIT_DIRS,
    SPLIT_ORDER,
    UNSPLIT,
    ImageFile,
    ImageFolder,
    scan_image_folder,
)
from featx.data.sources import open_source, with_urls
from featx.errors import UsageError

__all__ = ["MANIFEST_SUFFIXES", "is_manifest", "open_dataset", "read_manifest"]

MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet")
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
    return with_urls(read_manifest(path), path) if is_manifest(path) else scan_image_folder(path)


def _read_columns(path: Path) -> dict[str, list]:
    """The manifest's columns as lists of values (str for CSV/TSV, typed for Parquet)."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pydict()
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            header = next(reader, None)
            if header is None:
                return {}
            body = list(reader)
    except ImportError:
        raise UsageError(
            "reading a .parquet manifest needs pyarrow: pip install pyarrow."
        ) from None
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as error:
        raise UsageError(f"manifest {path} cannot be read ({error}).") from None
    header = [name.strip() for name in header]
    if len(set(header)) != len(header):
        raise UsageError(f"manifest {path} repeats a column name in its header.")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header) and any(cell.strip() for cell in row):
            raise UsageError(
                f"manifest {path} line {number} has {len(row)} fields, not {len(header)}."
            )
    body = [row for row in body if len(row) == len(header)]
    return {name: [row[i] for row in body] for i, name in enumerate(header)}


def _metadata_values(values: list) -> tuple:
    """Numbers when every cell is a number (as CSV text or typed), else strings."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return tuple(values)
    for kind in (int, float):
        try:
            return tuple(kind(v) for v in values)
        except (TypeError, ValueError):
            continue
    return tuple("" if v is None else str(v) for v in values)


def read_manifest(path: str | os.PathLike) -> ImageFolder:
    """List the images of a manifest; UsageError if it is missing, empty or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"manifest {path} does not exist or is not a file.")
    columns = _read_columns(path)
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
    root = path.parent
    base = str(root.resolve())
    paths = [_relative(str(p).strip(), base, path) for p in columns["path"]]
    labels = [str(v).strip() for v in columns["label"]]
    if "" in labels:
        raise UsageError(
            f"manifest {path} has a row with an empty label ({paths[labels.index('')]})."
        )
    if "split" in columns:
        splits = []
        for value, image in zip(columns["split"], paths, strict=True):
            split = SPLIT_DIRS.get(str(value).strip().lower())
            if split is None:
                raise UsageError(
                    f"manifest {path} gives {image} the unknown split {value!r}; use train, "
                    "validation (or val) or test."
                )
            splits.append(split)
    else:
        splits = [UNSPLIT] * n
    seen: set[str] = set()
    for image in paths:
        if image in seen:
            raise UsageError(f"manifest {path} lists {image} twice.")
        seen.add(image)

    class_names = sorted(set(labels))
    label_of = {name: i for i, name in enumerate(class_names)}
    order = sorted(range(n), key=lambda i: (SPLIT_ORDER[splits[i]], label_of[labels[i]], paths[i]))
    files = []
    for i in order:
        size, mtime_ns = _stat(os.path.join(base, paths[i]))
        files.append(ImageFile(paths[i], label_of[labels[i]], splits[i], size, mtime_ns))
    meta = {
        name: _metadata_values([values[i] for i in order])
        for name, values in columns.items()
        if name not in (*REQUIRED, "split")
    }
    return ImageFolder(root, tuple(class_names), tuple(files), meta=meta)


def _relative(image: str, root: str, manifest: Path) -> str:
    """A manifest path as stored: relative to the manifest's folder when below it.
    (String functions, not pathlib: this runs once per image of possibly millions.)"""
    if not image:
        raise UsageError(f"manifest {manifest} has a row with an empty path.")
    if "://" in image:  # a URL, read through fsspec (featx.data.sources.urls)
        return image
    image = os.path.normpath(image)
    if os.path.isabs(image):
        inside = os.path.relpath(image, root)
        return image if inside.startswith("..") else inside
    return image


def _stat(file: str) -> tuple[int, int]:
    """(size, mtime_ns), or (-1, 0) for a missing file, which extraction then skips."""
    try:
        st = os.stat(file)
    except OSError:
        return -1, 0
    return st.st_size, st.st_mtime_ns
