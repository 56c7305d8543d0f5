"""The model file's zip container: its members, read with the bytes they really inflate to
counted while streaming.

A zip's directory states each member's sizes, but nothing holds an archive to them: a member
may inflate to a thousand times the bytes it takes in the file whatever the directory says.
So every member is read in chunks and refused as soon as it passes what featx ever writes
for it: JSON members at most `MAX_JSON_BYTES`, others at most `MAX_RATIO` times the bytes
of the whole file (and `MAX_MEMBER_BYTES`), never less than `FLOOR_BYTES`. The members of the
skops pipeline (itself a zip) are stored uncompressed, as skops writes them, so they cannot
inflate at all.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from featx.errors import UsageError
from featx.runtime import human_size

__all__ = [
    "HEADS",
    "HEADS_SPEC",
    "PIPELINE",
    "PROVENANCE",
    "check_sizes",
    "member_limit",
    "pipeline_types",
    "read_member",
    "reason",
]

PROVENANCE, PIPELINE, HEADS_SPEC, HEADS = (
    "provenance.json",
    "pipeline.skops",
    "heads.json",
    "heads.safetensors",
)
MAX_MEMBER_BYTES = 4 << 30
MAX_JSON_BYTES = 64 << 20
# deflate packs featx's arrays 1-5 times and a skops schema of many small trees about 40 times
MAX_RATIO = 100
FLOOR_BYTES = 64 << 20
_CHUNK = 1 << 20


def reason(error: Exception) -> str:
    """An exception as one line of text, for a one-sentence message."""
    text = " ".join(str(error).split()).rstrip(".")[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def member_limit(name: str, packed: int) -> int:
    """The most bytes member `name` may unpack to, in an archive of `packed` bytes."""
    if name.endswith(".json"):
        return MAX_JSON_BYTES
    return min(MAX_MEMBER_BYTES, max(FLOOR_BYTES, MAX_RATIO * packed))


def _too_large(path: Path, name: str, size: str, packed: int) -> UsageError:
    return UsageError(
        f"model file {path} has a member {name} that unpacks to {size}, more than featx "
        f"writes in a file of {human_size(packed)}; featx refuses it."
    )


def check_sizes(zf: zipfile.ZipFile, path: Path, packed: int, prefix: str = "") -> None:
    """UsageError for a member whose stated size is already past its limit (the stated
    sizes are not trusted beyond this: `read_member` counts the real bytes)."""
    for info in zf.infolist():
        if info.file_size > member_limit(info.filename, packed):
            raise _too_large(
                path,
                prefix + info.filename,
                f"{human_size(info.file_size)} from {human_size(info.compress_size)}",
                packed,
            )


def read_member(zf: zipfile.ZipFile, name: str, path: Path, packed: int) -> bytes:
    """The bytes of member `name`, inflated in chunks and counted: reading stops and a
    UsageError is raised once they pass `member_limit`, whatever the directory states."""
    limit = member_limit(name, packed)
    chunks, total = [], 0
    with zf.open(name) as fh:
        while chunk := fh.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise _too_large(path, name, f"more than {human_size(limit)}", packed)
            chunks.append(chunk)
    return b"".join(chunks)


def pipeline_types(skops_bytes: bytes, path: Path) -> set[str]:
    """Every type named in a skops file's schema (objects, functions, types, containers);
    UsageError if one of its members is compressed."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("__module__"), str) and isinstance(node.get("__class__"), str):
                found.add(f"{node['__module__']}.{node['__class__']}")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    with zipfile.ZipFile(io.BytesIO(skops_bytes)) as inner:
        for info in inner.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise UsageError(
                    f"model file {path} has a compressed member {PIPELINE}/{info.filename}, "
                    "which featx never writes; featx refuses it."
                )
        walk(json.loads(read_member(inner, "schema.json", path, len(skops_bytes))))
    return found
