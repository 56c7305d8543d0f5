"""What a store file may read outside itself: nothing, except the shard stores that
`featx merge --virtual` mapped and recorded.

HDF5 can make a file read other files: a dataset's external storage (raw bytes of any file), a
virtual dataset (any dataset of any HDF5 file, a missing one read as the fill value) and an
external link. A store opened by featx is walked once with h5py's low-level API, reading no
data, and every such reference is refused, but for the virtual layers of a merged store: each
of them must map, in row order, the same layer of the shard stores that the store's meta lists
under `virtual_sources` (absolute path, rows, identity), and each shard must exist, be a featx
shard store that points nowhere itself, and still have the identity recorded at the merge.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import h5py
from h5py import h5d, h5l, h5o

from featx.errors import UsageError

__all__ = ["VirtualMap", "check_virtual_sources", "shard_identity", "walk_store"]

FEATURES = "features/"


@dataclass(frozen=True)
class VirtualMap:
    """One mapping of a virtual layer: rows [start, stop) read dataset `dataset` of `file`."""

    file: str
    dataset: str
    start: int
    stop: int
    whole_source: bool  # the mapping reads the whole source dataset


def _mappings(dcpl: h5py.h5p.PropDCID) -> list[VirtualMap]:
    maps = []
    for i in range(dcpl.get_virtual_count()):
        vspace, source = dcpl.get_virtual_vspace(i), dcpl.get_virtual_srcspace(i)
        (lo, *_), (hi, *_) = vspace.get_select_bounds()
        row_size = math.prod(vspace.shape[1:])
        whole = (
            source.get_select_type() == h5py.h5s.SEL_ALL
            and vspace.get_select_npoints() == (hi - lo + 1) * row_size
        )
        maps.append(
            VirtualMap(
                dcpl.get_virtual_filename(i),
                dcpl.get_virtual_dsetname(i).lstrip("/"),
                int(lo),
                int(hi) + 1,
                whole,
            )
        )
    return maps


def walk_store(f: h5py.File, path: Path, allow_virtual: bool = True) -> dict[str, list[VirtualMap]]:
    """The virtual layers of an open store file, by key, with their mappings; UsageError, on the
    first external link, dataset stored in another file, or virtual dataset outside /features
    (or anywhere, without `allow_virtual`). Reads no data."""
    found: list[tuple[str, int]] = []
    f.id.links.visit(
        lambda name, info: found.append((name.decode(errors="replace"), info.type)), info=True
    )
    virtual: dict[str, list[VirtualMap]] = {}
    for name, kind in found:
        if kind == h5l.TYPE_EXTERNAL:
            _refuse(path, f"/{name} is a link to another file")
        if kind not in (h5l.TYPE_HARD, h5l.TYPE_SOFT):
            _refuse(path, f"/{name} is a link of an unknown kind ({kind})")
        if kind != h5l.TYPE_HARD:
            continue  # a soft link names a path inside this file
        obj = h5o.open(f.id, name.encode())
        if not isinstance(obj, h5d.DatasetID):
            continue
        dcpl = obj.get_create_plist()
        if dcpl.get_external_count():
            _refuse(path, f"/{name} keeps its data in another file (HDF5 external storage)")
        if dcpl.get_layout() == h5d.VIRTUAL:
            if not allow_virtual or not name.startswith(FEATURES):
                _refuse(path, f"/{name} is a virtual dataset reading other files")
            virtual[name[len(FEATURES) :]] = _mappings(dcpl)
    return virtual


def _refuse(path: Path, problem: str) -> NoReturn:
    raise UsageError(
        f"store {path} reads files outside itself: {problem}; featx reads only the files it is "
        "given."
    )


def shard_identity(path: str | os.PathLike) -> str:
    """What a shard store is, for a virtual store that maps it: a hash of its provenance text
    (which a new extraction renews) and of its layers' names, shapes and types. UsageError
    unless `path` is a featx shard store that reads no other file."""
    path = Path(path)
    if not path.is_file():
        problem = "is not a regular file" if path.exists() else "is missing"
        raise UsageError(f"shard store {path} {problem}.")
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise UsageError(f"shard store {path} is not a readable HDF5 file ({error}).") from None
    with f:
        walk_store(f, path, allow_virtual=False)
        meta = f.attrs.get("meta")
        meta = meta.decode() if isinstance(meta, bytes) else meta
        try:
            is_shard = isinstance(json.loads(meta).get("shard"), dict)
        except (TypeError, ValueError, AttributeError):
            is_shard = False
        if f.attrs.get("featx_format") not in ("featx-store", b"featx-store") or not is_shard:
            raise UsageError(f"{path} is not a featx shard store.")
        digest = hashlib.sha256(meta.encode())
        features = f.get("features")
        for key in sorted(features) if isinstance(features, h5py.Group) else []:
            ds = features[key]
            digest.update(json.dumps([key, list(ds.shape), str(ds.dtype)]).encode())
    return digest.hexdigest()


def _recorded(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    sources = meta.get("virtual_sources")
    ok = isinstance(sources, list) and all(
        isinstance(s, dict)
        and isinstance(s.get("path"), str)
        and os.path.isabs(s["path"])
        and isinstance(s.get("n_rows"), int)
        and isinstance(s.get("identity"), str)
        for s in sources
    )
    if not ok or not sources:
        _refuse(path, "its virtual layers were not written by `featx merge --virtual`")
    return sources


def check_virtual_sources(
    path: Path, virtual: dict[str, list[VirtualMap]], meta: dict[str, Any]
) -> None:
    """UsageError unless every virtual layer maps the recorded shards, in order, and every
    shard still is what the merge recorded."""
    if not virtual:
        return
    sources = _recorded(path, meta)
    expected: list[tuple[str, int, int]] = []
    start = 0
    for source in sources:
        if source["n_rows"]:
            expected.append((source["path"], start, start + source["n_rows"]))
        start += source["n_rows"]
    for key, maps in virtual.items():
        got = [(m.file, m.start, m.stop) for m in maps]
        if got != expected or not all(
            m.whole_source and m.dataset == f"{FEATURES}{key}" for m in maps
        ):
            _refuse(path, f"layer {key} is not a mapping of its recorded shards")
    _check_identities(path, sources)


def _check_identities(path: Path, sources: Sequence[dict[str, Any]]) -> None:
    for source in sources:
        shard = Path(source["path"])
        try:
            identity = shard_identity(shard)
        except UsageError as error:
            raise UsageError(
                f"store {path} maps the shard {shard}, which cannot be used: "
                f"{str(error).rstrip('.')}; run `featx merge` again on the shards."
            ) from None
        if identity != source["identity"]:
            raise UsageError(
                f"shard {shard} changed after `featx merge --virtual` wrote store {path} (it "
                "was extracted again or edited); run `featx merge` again on the shards."
            )
