"""Join the shard stores of one extraction (`featx extract --shard I/N`) into one store.

The merged store equals a one-process run: the shards' rows concatenated in shard order, the
same /files, classes and provenance, with the merge added to the history. Layers are copied in
bounded row blocks, or, with `virtual=True`, mapped by HDF5 virtual datasets onto the shard
files, which then must stay where they are. The store is written to a temporary file and
renamed, so OUT is only ever replaced whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx.data.preprocessing import Preprocessing
from featx.errors import UsageError
from featx.runtime import library_versions, now
from featx.store.feature_store import FeatureStore, add_layer, write_store
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


def merge(
    out: str | os.PathLike,
    shards: Sequence[str | os.PathLike],
    virtual: bool = False,
    command: str | None = None,
) -> Path:
    """Write the store OUT from the shard stores `shards` (any order); return OUT's path."""
    out = Path(out)
    if not shards:
        raise UsageError("give the shard stores to merge.")
    stores = [FeatureStore(path) for path in shards]
    try:
        stores = _in_order(stores)
        if out.resolve() in {s.path.resolve() for s in stores}:
            raise UsageError(f"{out} is one of the shards; write the merged store elsewhere.")
        keys = _common_layers(stores)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with _skeleton(tmp, stores, keys, command, virtual) as h5:
                for key in keys:
                    (_map_layer if virtual else _copy_layer)(h5, key, stores)
                h5.flush()
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        for store in stores:
            store.close()
    return out


def _shared(store: FeatureStore, name: str) -> Any:
    """A SAME field of a shard's meta, as what it means: a preprocessing record made before a
    field existed reads as that field's default, as extraction reads it."""
    value = store.meta.get(name)
    if name == "preprocessing" and isinstance(value, dict):
        return Preprocessing.from_dict(value)
    return value


def _in_order(stores: list[FeatureStore]) -> list[FeatureStore]:
    """The shards sorted by index; UsageError unless they are the whole of one extraction."""
    for store in stores:
        if "shard" not in store.meta:
            raise UsageError(f"{store.path} is not a shard store (made without --shard).")
    first = stores[0]
    for store in stores[1:]:
        for name, what in SAME:
            if _shared(store, name) != _shared(first, name):
                raise UsageError(
                    f"{store.path} and {first.path} were made with a different {what}; "
                    "shards of one extraction must share it."
                )
    count = first.meta["shard"]["count"]
    by_index: dict[int, FeatureStore] = {}
    for store in stores:
        shard = store.meta["shard"]
        if shard["count"] != count:
            raise UsageError(
                f"{store.path} is shard {shard['index']} of {shard['count']}, but "
                f"{first.path} is one of {count}; merge the shards of one split."
            )
        if shard["index"] in by_index:
            raise UsageError(
                f"{store.path} and {by_index[shard['index']].path} are both shard "
                f"{shard['index']} of {count}: their rows overlap."
            )
        by_index[shard["index"]] = store
    missing = [str(i) for i in range(count) if i not in by_index]
    if missing:
        raise UsageError(f"shard {', '.join(missing)} of {count} is missing; merge all {count}.")
    ordered = [by_index[i] for i in range(count)]
    end = 0
    for store in ordered:  # contiguous and complete, as planned
        shard = store.meta["shard"]
        if shard["first_row"] != end:
            raise UsageError(f"{store.path} does not start where the previous shard ends.")
        end += shard["n_rows"]
    if end != first.meta["shard"]["n_rows_total"]:
        raise UsageError(f"the shards cover {end} of {first.meta['shard']['n_rows_total']} rows.")
    return ordered


def _common_layers(stores: list[FeatureStore]) -> list[str]:
    first = stores[0]
    keys = first.layers
    for store in stores[1:]:
        if store.layers != keys:
            raise UsageError(
                f"{store.path} has layers {', '.join(store.layers) or 'none'}, but "
                f"{first.path} has {', '.join(keys) or 'none'}; extract the same layers."
            )
        for key in keys:
            a, b = first.layer(key), store.layer(key)
            if (a.shape, a.dtype, a.attrs.get("pool"), a.attrs.get("precision")) != (
                b.shape,
                b.dtype,
                b.attrs.get("pool"),
                b.attrs.get("precision"),
            ):
                raise UsageError(
                    f"layer {key} is {b.dtype} {b.attrs.get('precision')} in {store.path} but "
                    f"{a.dtype} {a.attrs.get('precision')} in {first.path}; shards must match."
                )
    return keys


def _columns(path: Path, group: str) -> dict[str, np.ndarray]:
    """Every dataset under /group of a store file, by its path below the group."""
    columns: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:

        def visit(name: str, item: Any) -> None:
            if isinstance(item, h5py.Dataset):
                columns[name] = item.asstr()[()] if item.dtype.kind == "O" else item[()]

        h5[group].visititems(visit)
    return columns


def _skeleton(
    tmp: Path, stores: list[FeatureStore], keys: list[str], command: str | None, virtual: bool
) -> h5py.File:
    """The merged store file with everything but the features; a virtual store's meta lists
    the shards its layers map, with their identities."""
    meta = {k: v for k, v in stores[0].meta.items() if k not in ("shard", "virtual_sources")}
    if virtual:
        meta["virtual_sources"] = [
            {"path": str(s.path.resolve()), "n_rows": s.n_rows, "identity": shard_identity(s.path)}
            for s in stores
        ]
    history = list(meta.get("history", []))
    history.append(
        {
            "time": now(),
            "command": command or "featx.merge",
            "layers": keys,
            "shards": [str(s.path.resolve()) for s in stores],
        }
    )
    meta.update(versions=library_versions(), history=history)
    parts = [_columns(s.path, "rows") for s in stores]
    rows = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return write_store(
        tmp,
        json.loads(json.dumps(meta)),
        stores[0].class_names,
        files=_columns(stores[0].path, "files"),
        rows={k: v.astype(object) if v.dtype.kind == "U" else v for k, v in rows.items()},
        skipped=[item for s in stores for item in s.skipped],
    )


VARYING = ("engine", "batch_size")  # shards of one store may differ in these (mixed nodes)


def _merged_attrs(key: str, stores: list[FeatureStore]) -> dict:
    """Layer `key`'s attributes in the first shard, with every value of VARYING that the
    shards differ in listed ("eager, openvino")."""
    per_shard = []
    for store in stores:
        with h5py.File(store.path, "r") as h5:
            per_shard.append(dict(h5["features"][key].attrs))
    attrs = per_shard[0]
    for name in VARYING:
        values = sorted({str(a[name]) for a in per_shard if name in a})
        if len(values) > 1:
            attrs[name] = ", ".join(values)
    return attrs


def _copy_layer(out: h5py.File, key: str, stores: list[FeatureStore]) -> None:
    attrs = _merged_attrs(key, stores)
    with h5py.File(stores[0].path, "r") as h5:
        first = h5["features"][key]
        row_shape, dtype = first.shape[1:], first.dtype
        compression = first.compression or "none"

    def blocks() -> Iterator[np.ndarray]:
        for store in stores:
            with h5py.File(store.path, "r") as h5:
                ds = h5["features"][key]
                step = max(1, BLOCK_BYTES // max(1, int(np.prod(row_shape)) * dtype.itemsize))
                for start in range(0, len(ds), step):
                    yield ds[start : start + step]

    n_rows = sum(s.n_rows for s in stores)
    add_layer(out, key, n_rows, tuple(row_shape), str(dtype), compression, attrs, blocks())


def _map_layer(out: h5py.File, key: str, stores: list[FeatureStore]) -> None:
    """A virtual dataset over the shards' layer `key`, by absolute path."""
    attrs = _merged_attrs(key, stores)
    with h5py.File(stores[0].path, "r") as h5:
        first = h5["features"][key]
        row_shape, dtype = first.shape[1:], first.dtype
    n_rows = sum(s.n_rows for s in stores)
    layout = h5py.VirtualLayout(shape=(n_rows, *row_shape), dtype=dtype)
    start = 0
    for store in stores:
        if store.n_rows:
            source = h5py.VirtualSource(
                str(store.path.resolve()), f"features/{key}", shape=(store.n_rows, *row_shape)
            )
            layout[start : start + store.n_rows] = source
        start += store.n_rows
    ds = out["features"].create_virtual_dataset(key, layout, fillvalue=np.nan)
    ds.attrs.update(attrs)
