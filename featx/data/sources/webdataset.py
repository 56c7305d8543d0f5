"""WebDataset tar shards: images read in place by offset, never unpacked.

A sample is the members of a shard sharing a key (`dir/000123.jpg`, `dir/000123.cls`: the
key is the name up to the first dot of its last part, as `webdataset` groups them). Its image
is the member with an image extension; its class is `.cls` (a class index), else `.txt` (a
class name) or `.json` (`{"label": name or index}`). Class indices name the lines of a
`classes.txt` beside the first shard when there is one. A `.json` may give `"split"`; else a
shard named `train-*.tar`, `val*`, `validation*` or `test*` gives its split.

One pass over each shard's headers (`tarfile`) lists the samples; the rows are named
`SHARD.tar/MEMBER` (`MEMBER` when one tar file is given: the dataset's root names it) and
identified by their member names, sizes and times, not by stat'ing.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from featx.data.folders import IMAGE_EXTENSIONS, UNSPLIT, ImageFolder, printable
from featx.data.sources.base import (
    Row,
    build_dataset,
    expand_paths,
    split_of,
)
from featx.data.sources.location import PackedRoot, UnreadableRow
from featx.errors import UsageError

__all__ = ["TarReader", "read_shards"]

SUFFIXES = (".tar",)
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_LABEL_EXTENSIONS = ("cls", "txt", "json")


@dataclass
class TarReader:
    """Reads members of tar shards by (offset, size) from an index of one header pass."""

    shards: dict[str, str]  # shard name in row paths -> its file (one: not in row paths)
    index: dict[str, tuple[int, int]] = field(default_factory=dict)  # row -> (offset, size)
    _files: dict = field(default_factory=dict, repr=False, compare=False)
    _pid: int = field(default=0, repr=False, compare=False)

    def read(self, name: str) -> bytes:
        shard = name.split("/", 1)[0] if len(self.shards) > 1 else next(iter(self.shards))
        offset, size = self.index[name]
        if self._pid != os.getpid():  # a forked decoding process opens its own files
            self._files, self._pid = {}, os.getpid()
        try:
            handle = self._files.get(shard)
            if handle is None:
                handle = self._files[shard] = open(self.shards[shard], "rb")
            handle.seek(offset)
            data = handle.read(size)
        except OSError as error:
            raise UnreadableRow(f"cannot read {shard} ({error.strerror or error})") from None
        if len(data) != size:
            raise UnreadableRow(f"truncated member of {shard}")
        return data

    def __getstate__(self) -> dict:
        return {"shards": self.shards, "index": self.index}

    def __setstate__(self, state: dict) -> None:
        self.shards, self.index, self._files, self._pid = state["shards"], state["index"], {}, 0

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


def _classes_txt(first: Path) -> list[str] | None:
    path = first.parent / "classes.txt"
    if not path.is_file():
        return None
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} cannot be read ({error}).") from None
    names = [n for n in names if n]
    if len(set(names)) != len(names) or not names:
        raise UsageError(f"{path} must list each class name once, one per line.")
    return names


def _shard_split(shard: Path) -> str:
    head = re.split(r"[-_.]", shard.name, maxsplit=1)[0].lower()
    return split_of(head, str(shard)) if head in ("train", "val", "validation", "test") else UNSPLIT


@dataclass
class _Sample:
    image: tarfile.TarInfo | None = None
    label: object = None
    split: object = None


def _label_value(ext: str, data: bytes, where: str) -> tuple[object, object]:
    """(label, split) of a label member: an int index for .cls, else a name or index."""
    try:
        text = data.decode("utf-8").strip()
        if ext == "cls":
            return int(text), None
        if ext == "txt":
            return text, None
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise UsageError(f"{where} is not a valid .{ext} label.") from None
    if not isinstance(value, dict):
        return value, None
    return value.get("label"), value.get("split")


def _samples(shard: Path, prefix: str) -> tuple[dict[str, _Sample], dict[str, tuple[int, int]]]:
    samples: dict[str, _Sample] = {}
    index: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                match = _KEY.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                sample = samples.setdefault(key, _Sample())
                if f".{ext}" in IMAGE_EXTENSIONS and sample.image is None:
                    sample.image = member
                    index[f"{prefix}{member.name}"] = (member.offset_data, member.size)
                elif ext in _LABEL_EXTENSIONS:
                    data = tar.extractfile(member).read()
                    label, split = _label_value(ext, data, f"{shard}: {member.name}")
                    if ext == "cls" or sample.label is None:
                        sample.label = label if label is not None else sample.label
                    sample.split = split if split is not None else sample.split
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UsageError(f"{shard} is not a readable tar shard ({error}).") from None
    return samples, index


def _class_name(label: object, classes: list[str] | None, where: str) -> str:
    if isinstance(label, int) and not isinstance(label, bool):
        if classes is None:
            return str(label)
        if not 0 <= label < len(classes):
            raise UsageError(f"{where} has class index {label}; classes.txt lists {len(classes)}.")
        return classes[label]
    if isinstance(label, str) and label:
        return label
    raise UsageError(
        f"{where} has no label: give each sample a .cls (class index), .txt (class name) or "
        '.json ({"label": ...}) member.'
    )


def read_shards(spec, labelled: bool = True) -> ImageFolder | None:
    """The dataset of the tar shards `spec` names (a path, list, glob or brace notation), or
    None when it names no .tar files. Without `labelled` (to classify the images, as `featx
    predict` does), samples need no label and every row's class is ""."""
    shards = expand_paths(spec, SUFFIXES)
    if not shards:
        return None
    names = [printable(s.name) for s in shards]
    if len(set(names)) != len(names):
        raise UsageError("tar shards in different folders share a file name; rename one.")
    classes = _classes_txt(shards[0]) if labelled else None
    reader = TarReader({n: str(s) for n, s in zip(names, shards, strict=True)})
    rows: list[Row] = []
    skipped: list[tuple[str, str]] = []
    for shard, name in zip(shards, names, strict=True):
        prefix = f"{name}/" if len(shards) > 1 else ""
        samples, index = _samples(shard, prefix)
        reader.index.update(index)
        for key, sample in samples.items():
            if sample.image is None:
                skipped.append((f"{prefix}{key}", "no image member in the sample"))
                continue
            where = f"{shard}: {key}"
            label = _class_name(sample.label, classes, where) if labelled else ""
            split = split_of(sample.split, where) if sample.split else _shard_split(shard)
            member = sample.image
            rows.append(
                Row(
                    f"{prefix}{member.name}",
                    label,
                    split,
                    member.size,
                    int(member.mtime) * 1_000_000_000,
                )
            )
    if classes is None and rows and all(r.label.isdigit() for r in rows):
        classes = [str(i) for i in sorted({int(r.label) for r in rows})]
    given = [spec] if isinstance(spec, (str, os.PathLike)) else spec
    root = PackedRoot(", ".join(os.path.abspath(s) for s in given), reader)
    return build_dataset(root, rows, classes, skipped=skipped)
