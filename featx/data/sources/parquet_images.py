"""Tables holding image bytes: Parquet files (Hugging Face's `image` struct of `{bytes, path}`,
img2dataset's `jpg` column) and the Arrow files of a saved Hugging Face dataset.

A `label` column gives the class (a name, or an index named by the table's Hugging Face
`ClassLabel` names); a `split` column the split. Other columns of numbers or text are kept as
per-row metadata; bytes and nested columns never are. Rows are named `FILE/ROW` (the row's
number in its file). A Parquet row's identity is its row group's metadata (row count and
column chunk sizes), so opening a dataset never reads its image bytes; an Arrow row's is its
byte length, read from the memory-mapped file's offsets.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from featx.data.folders import ImageFolder, printable
from featx.data.sources.base import (
    Row,
    build_dataset,
    expand_paths,
    metadata_column,
    split_of,
)
from featx.data.sources.location import PackedRoot, UnreadableRow
from featx.errors import UsageError

__all__ = ["TableReader", "image_column", "read_parquet_images", "table_rows"]

SUFFIXES = (".parquet",)
BYTES_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")


def image_column(schema) -> str | None:
    """The column holding image bytes: a struct with a binary `bytes` field (Hugging Face's
    Image feature), else a binary column named image, jpg, jpeg, png, webp or img."""
    import pyarrow as pa

    def binary(t) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    for f in schema:
        if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0:
            if binary(f.type.field("bytes").type):
                return f.name
    for name in BYTES_COLUMNS:
        if name in schema.names and binary(schema.field(name).type):
            return name
    return None


@dataclass
class TableReader:
    """Reads one row's image bytes: a Parquet row group (the last few kept), or a
    memory-mapped Arrow stream file (`arrow=True`)."""

    files: dict[str, str]  # file name in row paths -> its path
    column: str
    arrow: bool = False
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _pid: int = field(default=0, repr=False, compare=False)

    def _part(self, file: str, row: int):
        """(array holding the row, the row's index in it)."""
        if self._pid != os.getpid():
            self._cache, self._pid = {}, os.getpid()
        if self.arrow:
            if file not in self._cache:
                import pyarrow as pa

                with pa.memory_map(self.files[file]) as source:
                    self._cache[file] = pa.ipc.open_stream(source).read_all().column(self.column)
            return self._cache[file], row
        import pyarrow.parquet as pq

        key = (file, "meta")
        if key not in self._cache:
            meta = pq.ParquetFile(self.files[file]).metadata
            counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._cache[key] = list(itertools.accumulate(counts, initial=0))
        starts = self._cache[key]
        group = bisect.bisect_right(starts, row) - 1
        start = starts[group]
        if (file, group) not in self._cache:
            if len(self._cache) > 8:
                self._cache = {k: v for k, v in self._cache.items() if k[1] == "meta"}
            table = pq.ParquetFile(self.files[file]).read_row_group(group, columns=[self.column])
            self._cache[(file, group)] = table.column(self.column)
        return self._cache[(file, group)], row - start

    def read(self, name: str) -> bytes:
        file, row = name.rsplit("/", 1)
        try:
            array, i = self._part(file, int(row))
            value = array[i].as_py()
        except (OSError, ValueError) as error:
            raise UnreadableRow(f"cannot read {file} ({error})") from None
        if isinstance(value, dict):
            value = value.get("bytes") or _local_bytes(value.get("path"))
        if value is None:
            raise UnreadableRow("no image bytes in the row")
        return value

    def __getstate__(self) -> dict:
        return {"files": self.files, "column": self.column, "arrow": self.arrow}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _cache={}, _pid=0)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


def _local_bytes(path: str | None) -> bytes | None:
    """A Hugging Face image stored as the path of a local file instead of its bytes."""
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as error:
        raise UnreadableRow(f"{path}: {(error.strerror or str(error)).lower()}") from None


def class_label_names(features: dict | None, column: str = "label") -> list[str] | None:
    """The names of a Hugging Face ClassLabel feature, if the features declare one."""
    feature = (features or {}).get(column)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        names = feature.get("names")
        return [str(n) for n in names] if isinstance(names, list) else None
    return None


def table_rows(
    table, prefix: str, column: str, where: str, split: str | None = None
) -> tuple[list[Row], dict[str, list]]:
    """Rows (named PREFIX/ROW, label as found: int index or name) and metadata of a table
    read without its image column (`column` only as its byte lengths, when present)."""
    import pyarrow.compute as pc

    if "label" not in table.column_names:
        raise UsageError(f"{where} has no label column; each image needs a class.")
    labels = table.column("label").to_pylist()
    splits = table.column("split").to_pylist() if "split" in table.column_names else None
    sizes = [-1] * table.num_rows
    if column in table.column_names:
        values = table.column(column)
        if hasattr(values.type, "get_field_index"):
            values = pc.struct_field(values, "bytes")
        sizes = [-1 if n is None else n for n in pc.binary_length(values).to_pylist()]
    rows, width = [], max(6, len(str(table.num_rows)))
    for i, label in enumerate(labels):
        if label is None or label == "":
            raise UsageError(f"{where} row {i} has no label.")
        row_split = split or split_of(splits[i] if splits else None, f"{where} row {i}")
        rows.append(Row(f"{prefix}/{i:0{width}d}", label, row_split, sizes[i]))
    meta = {}
    for name in table.column_names:
        if name not in ("label", "split", column):
            values = metadata_column(table.column(name).to_pylist())
            if values is not None:
                meta[name] = values
    return rows, meta


def named_classes(rows: list[Row], names: list[str] | None, where: str) -> list[Row]:
    """Rows with their label as a class name: indices through `names`, else as text."""
    out = []
    for r in rows:
        label = r.label
        if isinstance(label, int) and not isinstance(label, bool):
            if names is not None and not 0 <= label < len(names):
                raise UsageError(f"{where} has class index {label} of {len(names)} classes.")
            label = names[label] if names is not None else str(label)
        out.append(Row(r.name, str(label), r.split, r.size, r.mtime_ns))
    return out


def class_order(rows: list[Row], names: list[str] | None) -> list[str] | None:
    """The class list: the ClassLabel names, numbers in numeric order, else None (sorted)."""
    if names is not None:
        return names
    if rows and all(r.label.isdigit() for r in rows):
        return [str(i) for i in sorted({int(r.label) for r in rows})]
    return None


def _row_group_digests(path: Path) -> list[int]:
    """Per row, a digest of its row group's metadata (row count, column chunk sizes)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    digests = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        parts = [group.num_rows] + [
            (group.column(c).total_compressed_size, group.column(c).total_uncompressed_size)
            for c in range(group.num_columns)
        ]
        digests.extend([zlib.crc32(repr(parts).encode())] * group.num_rows)
    return digests


def read_parquet_images(spec) -> ImageFolder | None:
    """The dataset of the Parquet files `spec` names when they hold image bytes; None for
    Parquet manifests (a `path` column and no image column) or names that are not Parquet."""
    import pyarrow.parquet as pq

    files = expand_paths(spec, SUFFIXES)
    if not files:
        return None
    try:
        schema = pq.read_schema(files[0])
    except (OSError, ValueError) as error:
        raise UsageError(f"{files[0]} is not a readable Parquet file ({error}).") from None
    column = image_column(schema)
    if column is None:
        if "path" in schema.names:
            return None
        raise UsageError(
            f"{files[0]} has no image column: give a Hugging Face image struct or a jpg, png "
            "or webp bytes column (or a path column naming image files)."
        )
    hf = json.loads((schema.metadata or {}).get(b"huggingface", b"{}") or b"{}")
    names = class_label_names(hf.get("info", {}).get("features"))
    reader = TableReader({}, column)
    rows, meta = [], {}
    for file in files:
        name = printable(file.name)
        if name in reader.files:
            raise UsageError("Parquet files in different folders share a file name; rename one.")
        reader.files[name] = str(file)
        try:
            table = pq.read_table(file, columns=[c for c in schema.names if c != column])
            digests = _row_group_digests(file)
        except (OSError, ValueError) as error:
            raise UsageError(f"{file} is not a readable Parquet file ({error}).") from None
        part, part_meta = table_rows(table, name, column, str(file))
        rows.extend(
            Row(r.name, r.label, r.split, r.size, d) for r, d in zip(part, digests, strict=True)
        )
        for key, values in part_meta.items():
            meta.setdefault(key, []).extend(values)
    meta = {k: v for k, v in meta.items() if len(v) == len(rows)}
    rows = named_classes(rows, names, str(files[0]))
    given = [spec] if isinstance(spec, (str, os.PathLike)) else spec
    root = PackedRoot(", ".join(os.path.abspath(s) for s in given), reader)
    return build_dataset(root, rows, class_order(rows, names), meta)
