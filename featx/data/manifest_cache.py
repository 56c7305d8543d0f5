"""A manifest as read, in store order, and featx's cache of it.

Every shard of an extraction reads the same manifest; the first to read it saves the result
as an Arrow file in featx's cache (`featx.runtime.cache_root()/manifests`), keyed by the
sha256 of the manifest's bytes and the folder its relative paths start from, so the others
map it instead of parsing it again. The cache is data only (no code runs when it loads); a
cache entry that cannot be written or read is ignored, and the manifest is read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.data.folders import SPLIT_ORDER

__all__ = ["CACHE_ROWS", "Parsed", "load_parsed", "save_parsed"]

SPLIT_NAMES = tuple(sorted(SPLIT_ORDER, key=SPLIT_ORDER.__getitem__))  # by code
CACHE_ROWS = 10_000  # smaller manifests read faster than a cache entry is written
KEPT = 8  # cache entries kept (the most recently used)
VERSION = 1  # of what a cache entry holds; entries of another version are not read


@dataclass(frozen=True)
class Parsed:
    """A manifest's rows in store order (split, class, path): relative paths, class codes
    into `class_names`, split codes into `SPLIT_NAMES`, metadata columns, the folders of the
    paths as spelled (for the check that no two of them are one folder on disk), and notes
    on what was left out."""

    class_names: tuple[str, ...]
    paths: np.ndarray  # object (str)
    labels: np.ndarray  # int32
    splits: np.ndarray  # int8
    meta: dict[str, np.ndarray]
    folders: tuple[str, ...]
    notes: tuple[str, ...] = ()
    urls: bool = False  # whether any row is a URL (read through fsspec)

    def split_names(self) -> np.ndarray:
        return np.array(SPLIT_NAMES, dtype=object)[self.splits]


def _entry(digest: str, base: str) -> Path | None:
    try:
        from featx.runtime import cache_root

        key = hashlib.sha256(f"{VERSION}\0{digest}\0{base}".encode()).hexdigest()[:32]
        return cache_root() / "manifests" / f"{key}.arrow"
    except Exception:  # no cache folder on this machine: read the manifest every time
        return None


def load_parsed(digest: str, base: str) -> Parsed | None:
    """The cached reading of the manifest whose bytes hash to `digest`, or None."""
    entry = _entry(digest, base)
    if entry is None or not entry.is_file():
        return None
    try:
        import pyarrow as pa

        with pa.memory_map(str(entry)) as source:
            table = pa.ipc.open_file(source).read_all()
        info = json.loads(table.schema.metadata[b"featx"])
        if info["version"] != VERSION or info["digest"] != digest:
            return None
        meta = {name: _numpy(table.column(f"meta:{name}")) for name in info["meta"]}
        parsed = Parsed(
            tuple(info["class_names"]),
            _numpy(table.column("path")),
            _numpy(table.column("label")).astype(np.int32, copy=False),
            _numpy(table.column("split")).astype(np.int8, copy=False),
            meta,
            tuple(info["folders"]),
            tuple(info["notes"]),
            info["urls"],
        )
        os.utime(entry)  # recently used: kept when the cache is pruned
        return parsed
    except Exception:  # unreadable, truncated or of another layout: read the manifest
        return None


def _numpy(column) -> np.ndarray:
    if column.type.equals(_string()):
        return column.to_numpy(zero_copy_only=False).astype(object, copy=False)
    return column.to_numpy()


def _string():
    import pyarrow as pa

    return pa.large_string()


def save_parsed(digest: str, base: str, parsed: Parsed) -> None:
    """Cache `parsed` (a manifest of at least CACHE_ROWS rows) for the next reading."""
    if len(parsed.paths) < CACHE_ROWS:
        return
    entry = _entry(digest, base)
    if entry is None:
        return
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        import pyarrow as pa

        columns = {
            "path": pa.array(parsed.paths, type=_string()),
            "label": pa.array(parsed.labels),
            "split": pa.array(parsed.splits),
        }
        for name, values in parsed.meta.items():
            text = values.dtype == object
            columns[f"meta:{name}"] = pa.array(values, type=_string() if text else None)
        info = {
            "version": VERSION,
            "digest": digest,
            "class_names": list(parsed.class_names),
            "meta": list(parsed.meta),
            "folders": list(parsed.folders),
            "notes": list(parsed.notes),
            "urls": parsed.urls,
        }
        table = pa.table(columns).replace_schema_metadata({"featx": json.dumps(info)})
        entry.parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, entry)
        _prune(entry.parent)
    except Exception:  # a full or read-only cache: the next shard reads the manifest itself
        tmp.unlink(missing_ok=True)


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.arrow"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEPT:]:
        old.unlink(missing_ok=True)
