"""Join the shard stores of one extraction (`featx extract --shard I/N`) into one store.

The merged store equals a one-process run: the shards' rows concatenated in shard order, the
same /files, classes and provenance, with the merge added to the history. Layers are copied in
bounded row blocks, or, with `virtual=True`, mapped by HDF5 virtual datasets onto the shard
files, which then must stay where they are (the merged store records their identities, and
refuses to read a shard that changed).

Shards are streamed: a shard file is open only while it is read, so a merge holds two files
open, and its memory does not grow with the rows, whatever the number of shards. The store is
written through `featx.runtime.atomic_output`, so OUT is only ever replaced whole; an existing
OUT that is not a merge of the same shards is replaced only with `overwrite=True`. Ctrl-C and
SIGTERM stop the merge between row blocks and leave OUT as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx.data.preprocessing import Preprocessing
from featx.errors import DiskFull, UsageError
from featx.runtime import (
    atomic_output,
    deferred_interrupts,
    human_size,
    library_versions,
    now,
)
from featx.store.feature_store import STR, FeatureStore, add_layer, write_store
from featx.store.sources import shard_identity

__all__ = ["merge"]

BLOCK_BYTES = 64 << 20  # rows copied at a time
# what every shard of one extraction shares, with how a difference is named
SAME = (
    ("backbone", "backbone"),
    ("weights_sha256", "weights (sha256)"),
    ("preprocessing", "preprocessing"),
    ("augment", "augment settings"),
    ("dataset", "dataset fingerprint"),
)
SHARD_FIELDS = ("index", "count", "first_row", "n_rows", "n_rows_total")
VARYING = ("engine", "batch_size")  # shards of one store may differ in these (mixed nodes)


@dataclass
class _Shard:
    """What a merge keeps of a shard while its file is closed."""

    path: Path
    info: dict[str, int]  # the SHARD_FIELDS of its meta
    n_rows: int
    layers: dict[str, tuple]  # key -> (row shape, dtype, pool, precision)
    varying: dict[str, dict[str, str]]  # key -> the VARYING attributes of the layer
    skipped: list[tuple[str, str]] = field(default_factory=list)
    engine_rows: dict[str, list] = field(default_factory=dict)  # key -> its engine ranges


def merge(
    out: str | os.PathLike,
    shards: Sequence[str | os.PathLike],
    virtual: bool = False,
    command: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the store OUT from the shard stores `shards` (any order); return OUT's path. An
    existing OUT is replaced only when it is a merge of the same shards, or with `overwrite`."""
    out = Path(out)
    if not shards:
        raise UsageError("give the shard stores to merge.")
    paths = [Path(p) for p in shards]
    if out.resolve() in {p.resolve() for p in paths}:
        raise UsageError(f"{out} is one of the shards; write the merged store elsewhere.")
    with deferred_interrupts(out) as check:
        first_meta, class_names, ordered = _read_shards(paths, check)
        _check_replace(out, ordered, overwrite)
        keys = list(ordered[0].layers)
        meta = _merged_meta(first_meta, ordered, keys, command, virtual, check)
        if not virtual:
            _check_space(out, ordered)
        with atomic_output(out) as tmp:
            skipped = [item for s in ordered for item in s.skipped]
            with _closing(write_store(tmp, meta, class_names, {}, {}, skipped)) as h5:
                _write_tables(h5, ordered, first_meta, check)
                for key in keys:
                    (_map_layer if virtual else _copy_layer)(h5, key, ordered, check)
            check()
    return out


@contextlib.contextmanager
def _closing(h5: h5py.File) -> Iterator[h5py.File]:
    """Close `h5` after the block. After a failure the file is abandoned: emptied first, so
    that on a full disk HDF5 has room to close it (else it fails again, at exit), then closed
    quietly, so that the first error is the one reported."""
    try:
        yield h5
    except BaseException:
        with contextlib.suppress(Exception):
            os.truncate(h5.filename, 0)
        with contextlib.suppress(Exception):
            h5.close()
        raise
    h5.close()


def _check_space(out: Path, shards: list[_Shard]) -> None:
    """DiskFull before any write when OUT's disk cannot hold the shards' layers: HDF5 cannot
    close a file cleanly once a write failed for space."""
    need = sum(
        s.n_rows * int(np.prod(shape)) * np.dtype(dtype).itemsize
        for s in shards
        for shape, dtype, *_ in s.layers.values()
    )
    need += need // 50 + (1 << 20)  # HDF5's metadata and the rows, roughly
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return  # named by the writer
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need > free:
        raise DiskFull(
            f"disk full: {out} needs about {human_size(need)} and its disk has "
            f"{human_size(free)} free; free some space and run the same command again."
        )


def _shared(meta: dict[str, Any], name: str) -> Any:
    """A SAME field of a shard's meta, as what it means: a preprocessing record made before a
    field existed reads as that field's default, as extraction reads it."""
    value = meta.get(name)
    if name == "preprocessing" and isinstance(value, dict):
        return Preprocessing.from_dict(value)
    return value


def _shard_info(path: Path, meta: dict[str, Any]) -> dict[str, int]:
    if "shard" not in meta:
        raise UsageError(f"{path} is not a shard store (made without --shard).")
    info = meta["shard"]
    if not isinstance(info, dict) or not all(
        isinstance(info.get(k), int) and not isinstance(info.get(k), bool) and info[k] >= 0
        for k in SHARD_FIELDS
    ):
        raise UsageError(
            f"{path} has shard metadata that is not the record `featx extract --shard` writes "
            f"(whole numbers {', '.join(SHARD_FIELDS)})."
        )
    return {k: info[k] for k in SHARD_FIELDS}


def _read_one(path: Path) -> tuple[_Shard, dict[str, Any], list[str]]:
    with FeatureStore(path) as store:
        info = _shard_info(store.path, store.meta)
        layers, varying = {}, {}
        for key in store.layers:
            layer = store.layer(key)
            layers[key] = (
                layer.shape,
                layer.dtype,
                layer.attrs.get("pool"),
                layer.attrs.get("precision"),
            )
            varying[key] = {k: str(layer.attrs[k]) for k in VARYING if k in layer.attrs}
        shard = _Shard(store.path, info, store.n_rows, layers, varying, store.skipped)
        shard.engine_rows = {key: _engine_ranges(store, key) for key in store.layers}
        return shard, store.meta, store.class_names


def _engine_ranges(store: FeatureStore, key: str) -> list:
    """[[engine, first row, row after the last], ...] of a shard's layer: its `engine_rows`,
    else all its rows computed by its one `engine` ("unknown" when it names several)."""
    attrs = store.layer(key).attrs
    try:
        ranges = json.loads(attrs["engine_rows"])
        if all(isinstance(r, list) and len(r) == 3 for r in ranges):
            return ranges
    except (KeyError, TypeError, ValueError):
        pass
    engine = str(attrs.get("engine", "unknown"))
    return [["unknown" if "," in engine else engine, 0, store.n_rows]] if store.n_rows else []


def _read_shards(
    paths: list[Path], check: Callable[[], None]
) -> tuple[dict[str, Any], list[str], list[_Shard]]:
    """(first shard's meta, class names, the shards in index order), each shard file open only
    while it is read; UsageError unless they are the whole of one extraction, alike."""
    shards: list[_Shard] = []
    first_meta: dict[str, Any] = {}
    class_names: list[str] = []
    for path in paths:
        shard, meta, names = _read_one(path)
        if not shards:
            first_meta, class_names = meta, names
        else:
            _check_alike(shard, meta, names, shards[0], first_meta, class_names)
        shards.append(shard)
        check()
    return first_meta, class_names, _in_order(shards)


def _check_alike(
    shard: _Shard,
    meta: dict[str, Any],
    names: list[str],
    first: _Shard,
    first_meta: dict[str, Any],
    first_names: list[str],
) -> None:
    for name, what in SAME:
        if _shared(meta, name) != _shared(first_meta, name):
            raise UsageError(
                f"{shard.path} and {first.path} were made with a different {what}; "
                "shards of one extraction must share it."
            )
    if names != first_names:
        raise UsageError(f"{shard.path} and {first.path} have different classes.")
    if list(shard.layers) != list(first.layers):
        raise UsageError(
            f"{shard.path} has layers {', '.join(shard.layers) or 'none'}, but "
            f"{first.path} has {', '.join(first.layers) or 'none'}; extract the same layers."
        )
    for key, (shape, dtype, pool, precision) in first.layers.items():
        if shard.layers[key] != (shape, dtype, pool, precision):
            b = shard.layers[key]
            raise UsageError(
                f"layer {key} is {b[1]} {b[3]} in {shard.path} but {dtype} {precision} in "
                f"{first.path}; shards must match."
            )


def _in_order(shards: list[_Shard]) -> list[_Shard]:
    """The shards sorted by index; UsageError unless they are the whole of one extraction."""
    first = shards[0]
    count = first.info["count"]
    by_index: dict[int, _Shard] = {}
    for shard in shards:
        index = shard.info["index"]
        if shard.info["count"] != count:
            raise UsageError(
                f"{shard.path} is shard {index} of {shard.info['count']}, but "
                f"{first.path} is one of {count}; merge the shards of one split."
            )
        if index in by_index:
            raise UsageError(
                f"{shard.path} and {by_index[index].path} are both shard {index} of {count}: "
                "their rows overlap."
            )
        by_index[index] = shard
    missing = [str(i) for i in range(count) if i not in by_index]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise UsageError(f"shard {shown} of {count} is missing; merge all {count}.")
    ordered = [by_index[i] for i in range(count)]
    end = 0
    for shard in ordered:  # contiguous and complete, as planned
        if shard.info["first_row"] != end:
            raise UsageError(f"{shard.path} does not start where the previous shard ends.")
        end += shard.info["n_rows"]  # planned rows, skipped files included
    if end != first.info["n_rows_total"]:
        raise UsageError(f"the shards cover {end} of {first.info['n_rows_total']} rows.")
    return ordered


def _merged_from(out: Path) -> list[str] | None:
    """The shard paths of the merge that wrote the store file `out`, or None. Reads only the
    file's attributes."""
    try:
        with h5py.File(out, "r") as h5:
            meta = h5.attrs.get("meta")
        meta = json.loads(meta.decode() if isinstance(meta, bytes) else meta)
        shards = meta["history"][-1]["shards"]
    except Exception:  # not HDF5, not a store, not merged: not the same merge
        return None
    return shards if isinstance(shards, list) else None


def _check_replace(out: Path, shards: list[_Shard], overwrite: bool) -> None:
    if overwrite or not out.is_file():
        return  # a folder or a missing parent is named by the writer
    if _merged_from(out) != [str(s.path.resolve()) for s in shards]:
        raise UsageError(
            f"{out} already exists and is not a merge of these shards; give --overwrite to "
            "replace it, or write the merged store elsewhere."
        )


def _merged_meta(
    first_meta: dict[str, Any],
    shards: list[_Shard],
    keys: list[str],
    command: str | None,
    virtual: bool,
    check: Callable[[], None],
) -> dict[str, Any]:
    """The merged store's provenance; a virtual store's lists the shards its layers map, with
    their identities."""
    meta = {k: v for k, v in first_meta.items() if k not in ("shard", "virtual_sources")}
    if virtual:
        meta["virtual_sources"] = []
        for s in shards:
            identity = shard_identity(s.path)
            meta["virtual_sources"].append(
                {"path": str(s.path.resolve()), "n_rows": s.n_rows, "identity": identity}
            )
            check()
    history = list(meta.get("history", []))
    history.append(
        {
            "time": now(),
            "command": command or "featx.merge",
            "layers": keys,
            "shards": [str(s.path.resolve()) for s in shards],
        }
    )
    meta.update(versions=library_versions(), history=history)
    return json.loads(json.dumps(meta))


def _column_types(h5: h5py.File, group: str) -> dict[str, Any]:
    """Every dataset under /group of a store file, by its path below the group, with its dtype
    (STR for text)."""
    types: dict[str, Any] = {}

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            text = h5py.check_string_dtype(item.dtype) is not None or item.dtype.kind in "SO"
            types[name] = STR if text else item.dtype

    h5[group].visititems(visit)
    return types


def _concat(out: h5py.File, group: str, shards: list[_Shard], check: Callable[[], None]) -> None:
    """/group of the merged store: the shards' /group columns one after the other."""
    with h5py.File(shards[0].path, "r") as h5:
        types = _column_types(h5, group)
    lengths = []
    for shard in shards:
        with h5py.File(shard.path, "r") as h5:
            if _column_types(h5, group) != types:
                raise UsageError(
                    f"{shard.path} has other /{group} columns than {shards[0].path}; "
                    "shards of one extraction must share them."
                )
            lengths.append(len(h5[group]["path"]))
    targets = {
        name: out.create_dataset(f"{group}/{name}", shape=(sum(lengths),), dtype=dtype)
        for name, dtype in types.items()
    }
    start = 0
    for shard, n in zip(shards, lengths, strict=True):
        with h5py.File(shard.path, "r") as h5:
            for name, dtype in types.items():
                ds = h5[group][name]
                values = ds.asstr()[()].astype(object) if dtype is STR else ds[()]
                targets[name][start : start + n] = values
        start += n
        check()


def _write_tables(
    out: h5py.File, shards: list[_Shard], meta: dict[str, Any], check: Callable[[], None]
) -> None:
    """/rows, concatenated, and /files: the first shard's when every shard holds the whole
    dataset's table, else concatenated too."""
    _concat(out, "rows", shards, check)
    with h5py.File(shards[0].path, "r") as h5:
        whole = len(h5["files"]["path"]) == meta["dataset"].get("n_files")
        if whole:
            h5.copy(h5["files"], out, name="files")
    if not whole:
        _concat(out, "files", shards, check)


def _merged_attrs(key: str, shards: list[_Shard]) -> dict:
    """Layer `key`'s attributes in the first shard, with every value of VARYING that the
    shards differ in listed ("eager, openvino"), and `engine_rows` the shards' ranges moved
    to where their rows are in the merged store."""
    with h5py.File(shards[0].path, "r") as h5:
        attrs = dict(h5["features"][key].attrs)
    for name in VARYING:
        values = sorted({s.varying[key][name] for s in shards if name in s.varying[key]})
        if len(values) > 1:
            attrs[name] = ", ".join(values)
    ranges: list[list] = []
    start = 0
    for shard in shards:
        for name, first, end in shard.engine_rows.get(key, []):
            if ranges and ranges[-1][0] == name and ranges[-1][2] == start + first:
                ranges[-1][2] = start + end
            else:
                ranges.append([name, start + first, start + end])
        start += shard.n_rows
    attrs["engine_rows"] = json.dumps(ranges)
    return attrs


def _copy_layer(out: h5py.File, key: str, shards: list[_Shard], check: Callable[[], None]) -> None:
    with h5py.File(shards[0].path, "r") as h5:
        compression = h5["features"][key].compression or "none"
    row_shape, dtype = shards[0].layers[key][:2]
    step = max(1, BLOCK_BYTES // max(1, int(np.prod(row_shape)) * np.dtype(dtype).itemsize))

    def blocks() -> Iterator[np.ndarray]:
        for shard in shards:
            with h5py.File(shard.path, "r") as h5:
                ds = h5["features"][key]
                for start in range(0, len(ds), step):
                    yield ds[start : start + step]
                    check()

    n_rows = sum(s.n_rows for s in shards)
    attrs = _merged_attrs(key, shards)
    add_layer(out, key, n_rows, tuple(row_shape), str(dtype), compression, attrs, blocks())


def _map_layer(out: h5py.File, key: str, shards: list[_Shard], check: Callable[[], None]) -> None:
    """A virtual dataset over the shards' layer `key`, by absolute path."""
    row_shape, dtype = shards[0].layers[key][:2]
    n_rows = sum(s.n_rows for s in shards)
    layout = h5py.VirtualLayout(shape=(n_rows, *row_shape), dtype=dtype)
    start = 0
    for shard in shards:
        if shard.n_rows:
            source = h5py.VirtualSource(
                str(shard.path.resolve()), f"features/{key}", shape=(shard.n_rows, *row_shape)
            )
            layout[start : start + shard.n_rows] = source
        start += shard.n_rows
    check()
    ds = out["features"].create_virtual_dataset(key, layout, fillvalue=np.nan)
    ds.attrs.update(_merged_attrs(key, shards))
