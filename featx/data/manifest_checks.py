"""Checks of a manifest's header and cells, made before any image is read: what would
otherwise fail only when the store is written (a column name HDF5 cannot hold, an integer
past int64), or silently give a wrong dataset (a null label read as the class "None", `1_000`
read as 1000, one image listed under two spellings of its path)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featx.data.folders import SPLIT_DIRS
from featx.errors import UsageError

__all__ = [
    "REQUIRED",
    "bytes_note",
    "check_cells",
    "check_duplicates",
    "check_required",
    "clean_columns",
    "metadata_values",
    "relative_path",
    "shown",
    "split_names",
]

REQUIRED = ("path", "label")

_INT64 = (-(1 << 63), (1 << 63) - 1)


def shown(text: Any) -> str:
    """`text` for a one-line message: control characters (a newline in a path) escaped."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(text))


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def clean_columns(path: Path, columns: list[tuple[str, list]]) -> dict[str, list]:
    """The (name, values) `columns` by name, without the nameless columns that hold nothing
    (a spreadsheet's trailing commas); UsageError for a nameless column with values, a
    repeated name or a name a store cannot hold."""
    kept: dict[str, list] = {}
    for number, (name, values) in enumerate(columns, start=1):
        name = str(name)
        if not name.strip():
            if all(_blank(v) for v in values):
                continue
            raise UsageError(f"manifest {path} has values in column {number}, which has no name.")
        if name in (".", "..") or "/" in name or not name.isprintable():
            raise UsageError(
                f"manifest {path} has a column named {shown(name)!r}; a column name cannot be "
                "'.' or '..' or hold '/' or control characters."
            )
        if name in kept:
            raise UsageError(f"manifest {path} repeats the column name {shown(name)!r}.")
        kept[name] = values
    return kept


def check_cells(path: Path, paths: Sequence[Any], labels: Sequence[Any]) -> None:
    """UsageError for a path holding a NUL byte, or a label that is null or holds control
    characters: featx takes labelled rows only (as a folder's images are those inside its
    class folders)."""
    for image, label in zip(paths, labels, strict=True):
        if isinstance(image, str) and "\0" in image:
            raise UsageError(f"manifest {path} has a path with a NUL byte ({shown(image)}).")
        if label is None:
            raise UsageError(
                f"manifest {path} has a row with no label ({shown(image)}); featx takes "
                "labelled rows only: label it or leave it out."
            )
        if not str(label).isprintable():
            raise UsageError(
                f"manifest {path} has a label with control characters ({shown(label)})."
            )


def metadata_values(values: list) -> tuple:
    """Numbers when every cell is one (typed, or CSV text as Python writes an int or float,
    within int64 for integers), else the cells as text, so that `1_000` stays `1_000`."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        if all(isinstance(v, float) or _INT64[0] <= v <= _INT64[1] for v in values):
            return tuple(values)
        return tuple(str(v) for v in values)
    texts = ["" if v is None else str(v) for v in values]
    if any("_" in t for t in texts):
        return tuple(texts)
    try:
        numbers = tuple(int(t) for t in texts)
    except ValueError:
        try:
            return tuple(float(t) for t in texts)
        except ValueError:
            return tuple(texts)
    # integers past int64 stay text: as floats they would lose their last digits
    return numbers if all(_INT64[0] <= x <= _INT64[1] for x in numbers) else tuple(texts)


def check_duplicates(path: Path, base: str, paths: Sequence[str]) -> None:
    """UsageError when two rows name one file, however spelled (absolute or relative, through
    a linked folder): rows are compared by their resolved folder and file name."""
    folders: dict[str, str] = {}
    seen: dict[str, str] = {}
    for image in paths:
        if "://" in image:
            key = image
        else:
            folder, name = os.path.split(os.path.join(base, image))
            if folder not in folders:
                folders[folder] = os.path.realpath(folder)
            key = os.path.join(folders[folder], name)
        if key in seen:
            first = seen[key]
            also = "" if first == image else f" (also as {shown(first)})"
            raise UsageError(f"manifest {path} lists {shown(image)} twice{also}.")
        seen[key] = image


def check_required(path: Path, columns: dict[str, Any], n_rows: int) -> None:
    """UsageError for a manifest without rows or without a path and a label column."""
    if not columns:
        raise UsageError(f"manifest {path} is empty: it lists no images.")
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        raise UsageError(
            f"manifest {path} has no {' or '.join(missing)} column; it needs path and label "
            "(and optionally split)."
        )
    if n_rows == 0:
        raise UsageError(f"manifest {path} lists no images.")


def split_names(path: Path, values: Sequence[Any], paths: Sequence[str]) -> list[str]:
    """Each row's split as featx names it; UsageError naming the first unknown one."""
    texts = [str(v) for v in values]
    named = {t: SPLIT_DIRS.get(t.strip().lower()) for t in set(texts)}
    splits = []
    for value, text, image in zip(values, texts, paths, strict=True):
        split = named[text]
        if split is None:
            raise UsageError(
                f"manifest {path} gives {shown(image)} the unknown split {value!r}; use train, "
                "validation (or val) or test."
            )
        splits.append(split)
    return splits


def relative_path(image: str, root: str, manifest: Path) -> str:
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


def bytes_note(path: Path, name: str) -> str:
    """The note on a column of bytes, which a store does not keep as metadata (a column of
    image bytes makes the file a dataset of images: see `featx.data.sources`)."""
    return f"manifest {path}: column {shown(name)!r} holds bytes, which are not kept as metadata."
