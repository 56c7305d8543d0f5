"""Where a row of a packed or remote dataset is: `PackedRoot / name` is a `Location`, which
`featx.data.folders.load_image` decodes from the bytes its `Reader` returns. A reader holds
only names and offsets, never an open file, so it pickles into the decoding processes, each of
which opens what it reads."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["Location", "PackedRoot", "Reader", "UnreadableRow"]


class UnreadableRow(OSError):
    """A row whose bytes cannot be read; the message is the one-line reason."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unreadable"


class Reader(Protocol):
    def read(self, name: str) -> bytes:
        """The bytes of row `name`; raise UnreadableRow saying why they cannot be read."""


class Location(os.PathLike):
    """One row of a packed or remote dataset: `open()` gives its bytes as a binary file."""

    __slots__ = ("name", "root")

    def __init__(self, root: PackedRoot, name: str):
        self.root, self.name = root, name

    def open(self) -> io.BytesIO:
        data = self.root.reader.read(self.name)
        if not data:
            raise UnreadableRow("empty file")
        return io.BytesIO(data)

    def __fspath__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return self.name if "://" in self.name else f"{self.root}/{self.name}"

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (other.root, other.name) == (self.root, self.name)

    def __hash__(self) -> int:
        return hash((str(self.root), self.name))


@dataclass(frozen=True, eq=True)
class PackedRoot:
    """The root of a packed or remote dataset: `root / name` is the row `name` as a `Location`
    (a local file for `local_root` names that are not URLs). `text` says what was read."""

    text: str
    reader: Reader
    local_root: Path | None = None

    def __truediv__(self, name: str | os.PathLike) -> Location | Path:
        name = str(name)
        if self.local_root is not None and "://" not in name:
            return self.local_root / name
        return Location(self, name)

    def resolve(self) -> PackedRoot:
        return self

    def __str__(self) -> str:
        return self.text

    def __fspath__(self) -> str:
        return self.text
