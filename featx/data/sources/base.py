"""What every packed or remote input shares: a row's location, the root rows are found under,
shard lists given as a list, a glob or brace notation, and the rows-to-dataset step.

A packed dataset (tar shards, parquet files of image bytes, a saved Hugging Face dataset) or a
manifest of URLs opens as the same `ImageFolder` as an image folder. Its `root` is a
`PackedRoot` (`featx.data.sources.location`): `root / row_path` is a row that `load_image`
decodes, so every command that decodes `folder.root / file.path` reads these inputs unchanged.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from featx.data.folders import SPLIT_DIRS, SPLIT_ORDER, UNSPLIT, ImageFile, ImageFolder
from featx.data.sources.location import PackedRoot
from featx.errors import UsageError

__all__ = [
    "Row",
    "build_dataset",
    "expand_paths",
    "metadata_column",
]


def expand_paths(spec: str | os.PathLike | Sequence, suffixes: tuple[str, ...]) -> list[Path]:
    """The files a spec names: a path, a list of paths, a glob (`shards/*.tar`) or brace
    notation (`train-{000000..000099}.tar`), each expanded and sorted; [] when it names none
    with one of `suffixes`. Raise UsageError for a pattern or listed file that is missing."""
    from braceexpand import braceexpand

    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not all(str(i).lower().endswith(suffixes) for i in items):
        return []
    files: list[Path] = []
    for item in items:
        text = str(item)
        for pattern in braceexpand(text):
            if glob.has_magic(pattern):
                found = sorted(glob.glob(pattern))
                if not found:
                    raise UsageError(f"{pattern} matches no files.")
                files.extend(Path(p) for p in found)
            elif not os.path.isfile(pattern):
                raise UsageError(f"{pattern} does not exist or is not a file.")
            else:
                files.append(Path(pattern))
    return list(dict.fromkeys(files))


def common_root(files: Sequence[Path]) -> Path:
    """The folder holding all of `files` (their nearest common folder)."""
    return Path(os.path.commonpath([str(f.resolve().parent) for f in files]))


def split_of(value: object, where: str) -> str:
    """A split name as featx uses it (train, validation, test), or UNSPLIT for none."""
    if value is None or value == "":
        return UNSPLIT
    split = SPLIT_DIRS.get(str(value).strip().lower())
    if split is None:
        raise UsageError(
            f"{where} has the unknown split {value!r}; use train, validation (or val) or test."
        )
    return split


@dataclass(frozen=True)
class Row:
    """One image of a packed or remote dataset before ordering: its name under the root, the
    class (a name), split, byte size and a time (0 when unknown)."""

    name: str
    label: str
    split: str
    size: int
    mtime_ns: int = 0


def build_dataset(
    root: PackedRoot,
    rows: Sequence[Row],
    class_names: Sequence[str] | None = None,
    meta: dict[str, Sequence] | None = None,
    skipped: Iterable[tuple[str, str]] = (),
) -> ImageFolder:
    """The `ImageFolder` of `rows`: rows in split, class, name order as for a folder, classes
    sorted by name unless `class_names` gives their order; `meta` columns follow the rows."""
    if not rows:
        raise UsageError(f"{root} holds no images.")
    names = list(class_names) if class_names else sorted({r.label for r in rows})
    label_of = {name: i for i, name in enumerate(names)}
    unknown = sorted({r.label for r in rows} - label_of.keys())
    if unknown:
        raise UsageError(f"{root} has labels outside its class list: {', '.join(unknown[:5])}.")
    seen: set[str] = set()
    for r in rows:
        if r.name in seen:
            raise UsageError(f"{root} holds {r.name} twice.")
        seen.add(r.name)
    order = sorted(
        range(len(rows)),
        key=lambda i: (SPLIT_ORDER[rows[i].split], label_of[rows[i].label], rows[i].name),
    )
    files = tuple(
        ImageFile(
            rows[i].name, label_of[rows[i].label], rows[i].split, rows[i].size, rows[i].mtime_ns
        )
        for i in order
    )
    columns = {name: tuple(values[i] for i in order) for name, values in (meta or {}).items()}
    return ImageFolder(root, tuple(names), files, skipped=tuple(skipped), meta=columns)


def metadata_column(values: Sequence) -> list | None:
    """A column as store metadata: numbers when every value is a finite or missing number,
    text when every value is text or missing, else None (bytes, nested values: not kept)."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        if all(isinstance(v, int) for v in present):
            return [0 if v is None else v for v in values]
        return [math.nan if v is None else float(v) for v in values]
    if all(isinstance(v, str) for v in present):
        return ["" if v is None else v for v in values]
    return None
