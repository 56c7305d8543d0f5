"""A store layer as embedding files for the rest of the ecosystem (embedding-reader, autofaiss,
clip-retrieval).

`npy`:     OUT/emb/img_emb_0000.npy          (rows, dim) float32, one row per store row
           OUT/metadata/metadata_0000.parquet path, label, split, view, source and a
                                              manifest's columns, row for row
`parquet`: OUT/emb/img_emb_0000.parquet      the same columns and `embedding`, a list of
                                              float32 per row

Files are numbered from 0000 and hold up to `rows_per_file` rows each, in store order;
embedding-reader reads them as `file_format="npy"` with `metadata_folder=OUT/metadata`, or
`file_format="parquet"` with `embedding_column="embedding"`. OUT/featx_export.json says what
was exported. Rows are read and written in blocks of about 64 MB, so memory does not grow with
the store. The export is written to a temporary folder beside OUT and renamed to OUT when
complete; an existing OUT that is not empty is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx import __version__
from featx.errors import UsageError, check_choice
from featx.runtime import deferred_interrupts, disk_errors, now
from featx.store.feature_store import FeatureStore

__all__ = ["EXPORT_FORMATS", "ExportResult", "export"]

EXPORT_FORMATS = ("npy", "parquet")
BLOCK_BYTES = 64 << 20
ROWS_PER_FILE = 1_000_000


@dataclass
class ExportResult:
    """What an export wrote: the folder, its embedding files, rows and dimension."""

    out: Path
    files: list[Path]
    n_rows: int
    dim: int
    nbytes: int


def export(
    store: str | os.PathLike,
    out: str | os.PathLike,
    layer: str,
    format: str = "npy",  # noqa: A002 - the CLI's --format
    *,
    split: str | None = None,
    rows_per_file: int = ROWS_PER_FILE,
    overwrite: bool = False,
) -> ExportResult:
    """Write layer `layer` of `store` (all rows, or one `split`) under `out` as `format`
    ("npy": embedding .npy files and metadata .parquet files; "parquet": one parquet file per
    part with an `embedding` column)."""
    check_choice("format", format, EXPORT_FORMATS)
    if rows_per_file < 1:
        raise UsageError("rows per file must be at least 1.")
    out = Path(out)
    pq = _pyarrow()
    _check_out(out, overwrite)
    with (
        FeatureStore(store) as source,
        h5py.File(source.path, "r") as h5,
        deferred_interrupts(out) as check,
    ):
        key = source.resolve(layer)
        rows = np.arange(source.n_rows)[source.rows(split)]
        dim = int(np.prod(source.layer(key).shape))
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with disk_errors(out):
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "emb").mkdir(parents=True)
                if format == "npy":
                    (tmp / "metadata").mkdir()
                names = []
                for number, start in enumerate(range(0, len(rows), rows_per_file)):
                    part = rows[start : start + rows_per_file]
                    blocks = _blocks(source, h5, key, part, dim, check)
                    names.append(_write_part(pq, tmp, number, format, blocks, len(part), dim))
                _record(tmp, source, key, format, len(rows), dim, split)
                check()
                _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    files = [out / "emb" / name for name in names]
    nbytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return ExportResult(out, files, len(rows), dim, nbytes)


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("featx export needs pyarrow: pip install pyarrow.") from None
    return pq


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; give a folder to export into.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(
            f"{out} already exists and is not empty; give --overwrite to replace it, or "
            "export into another folder."
        )


def _metadata(source: FeatureStore, h5: h5py.File, rows: np.ndarray):
    """The metadata table of `rows` (sorted): path, label (the class name), split, view,
    source and a manifest's columns, read from the store's /rows in one range."""
    import pyarrow as pa

    first, last = int(rows[0]), int(rows[-1]) + 1
    at = rows - first

    def column(name: str) -> list:
        ds = h5["rows"][name]
        text = h5py.check_string_dtype(ds.dtype) is not None or ds.dtype.kind in "SO"
        values = ds.asstr()[first:last] if text else ds[first:last]
        return values[at].tolist()

    names = np.array(source.class_names, dtype=object)
    columns = {
        "path": column("path"),
        "label": names[np.asarray(column("label"), dtype=np.int64)].tolist(),
        "split": column("split"),
        "view": column("view"),
        "source": column("source"),
    }
    for name in source.row_meta_columns:
        columns.setdefault(name, column(f"meta/{name}"))
    return pa.table(columns)


def _blocks(
    source: FeatureStore,
    h5: h5py.File,
    key: str,
    rows: np.ndarray,
    dim: int,
    check: Callable[[], None],
) -> Iterator[tuple[np.ndarray, Any]]:
    """(features as float32 (rows, dim), metadata table) of `rows` (sorted), in blocks of
    about 64 MB of features."""
    step = max(1, min(BLOCK_BYTES // (dim * 4), 65536))
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        block = source.read_rows(key, part)
        yield (
            block.reshape(len(block), dim).astype(np.float32, copy=False),
            _metadata(source, h5, part),
        )
        check()


def _write_part(pq, folder: Path, number: int, format: str, blocks, n_rows: int, dim: int):  # noqa: A002
    """One numbered part of `n_rows` rows; returns the embedding file's name."""
    import pyarrow as pa

    if format == "npy":
        name = f"img_emb_{number:04d}.npy"
        writer = None
        with open(folder / "emb" / name, "wb") as fh:
            header = {"descr": "<f4", "fortran_order": False, "shape": (n_rows, dim)}
            np.lib.format.write_array_header_1_0(fh, header)
            for block, meta in blocks:
                fh.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
                if writer is None:
                    path = folder / "metadata" / f"metadata_{number:04d}.parquet"
                    writer = pq.ParquetWriter(path, meta.schema)
                writer.write_table(meta)
            os.fsync(fh.fileno())
        writer.close()
        return name
    name = f"img_emb_{number:04d}.parquet"
    writer = None
    for block, meta in blocks:
        values = pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), dim)
        table = meta.append_column(pa.field("embedding", pa.list_(pa.float32(), dim)), values)
        if writer is None:
            writer = pq.ParquetWriter(folder / "emb" / name, table.schema)
        writer.write_table(table)
    writer.close()
    return name


def _record(
    folder: Path,
    source: FeatureStore,
    key: str,
    format: str,  # noqa: A002
    n_rows: int,
    dim: int,
    split: str | None,
) -> None:
    record = {
        "store": str(source.path.resolve()),
        "layer": key,
        "format": format,
        "split": split,
        "n_rows": n_rows,
        "dim": dim,
        "dtype": "float32",
        "backbone": source.meta.get("backbone"),
        "dataset_fingerprint": source.meta["dataset"]["fingerprint"],
        "time": now(),
        "featx": __version__,  # not every library: that would import torch
    }
    (folder / "featx_export.json").write_text(json.dumps(record, indent=1) + "\n")


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` folder to `out`, replacing what `out` held."""
    if out.is_dir():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
