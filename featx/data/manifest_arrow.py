"""A manifest read as columns with pyarrow: no Python object per row until the paths of the
store order are made, and every check of `featx.data.manifest_checks` run as an array
operation. When one finds a defect, the row-by-row check runs on that column to name the row
in the same sentence as without pyarrow; input this reader does not take exactly as Python's
csv module does (a quoted header, a row of the wrong width, text that is not UTF-8, columns
that are not text) returns None and is read row by row."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from featx.data.folders import SPLIT_DIRS, SPLIT_ORDER, UNSPLIT
from featx.data.manifest_cache import Parsed
from featx.data.manifest_checks import (
    bytes_note,
    check_cells,
    check_duplicates,
    check_required,
    clean_columns,
    metadata_values,
    relative_path,
    shown,
    split_names,
)
from featx.errors import UsageError

__all__ = ["WHITESPACE", "parse_arrow"]

# what str.strip() strips: the manifest's cells are stripped exactly as row by row
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
NOT_NORMAL = r"^$|^/|^\.|//|/\.|/$|://"  # paths relative_path would change (or refuse)
_SPACE = "[\t\n\f\r ]*"  # spaces Python's int() and float() also ignore
INT = rf"^{_SPACE}[+-]?[0-9]+{_SPACE}$"
FLOAT = rf"^{_SPACE}[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?{_SPACE}$"


def parse_arrow(path: Path, data: bytes, base: str) -> Parsed | None:
    """The manifest `path` (its bytes `data`) in store order; None to read it row by row."""
    try:
        import pyarrow as pa  # noqa: F401
    except ImportError:
        return None
    if os.sep != "/":
        return None
    named = _table(path, data)
    if named is None:
        return None
    columns = clean_columns(
        path, [(name, col.to_pylist() if not name.strip() else col) for name, col in named]
    )
    check_required(path, columns, len(columns["path"]) if "path" in columns else 0)
    if not all(_text(columns[c]) for c in ("path", "label", "split") if c in columns):
        return None
    if columns["path"].null_count:
        return None
    return _parsed(path, columns, base, data)


def _table(path: Path, data: bytes) -> list[tuple[str, Any]] | None:
    """(name, column) in header order, every CSV cell as text; None where the row-by-row
    reader must decide."""
    import pyarrow as pa

    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(data))
            return list(zip(table.column_names, table.columns, strict=True))
        return _csv(path, data)
    except (pa.ArrowException, OSError, ValueError):
        return None


def _csv(path: Path, data: bytes) -> list[tuple[str, Any]] | None:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    data = data.removeprefix(b"\xef\xbb\xbf")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    line, _, body = data.partition(b"\n")
    if b'"' in line or not body.strip():
        return None
    quoted = b'"' in body  # only a quoted cell can hold a line break
    header = [name.strip() for name in next(csv.reader([line.decode()], delimiter=delimiter))]
    names = [f"c{i}" for i in range(len(header))]

    def invalid(row) -> str:  # a row of blank cells is left out, as row by row
        return "skip" if not row.text.replace(delimiter, "").replace('"', "").strip() else "error"

    table = pcsv.read_csv(
        io.BytesIO(body),
        read_options=pcsv.ReadOptions(column_names=names),
        parse_options=pcsv.ParseOptions(
            delimiter=delimiter, newlines_in_values=quoted, invalid_row_handler=invalid
        ),
        convert_options=pcsv.ConvertOptions(
            column_types={n: pa.large_string() for n in names},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    return list(zip(header, table.columns, strict=True))


def _text(column) -> bool:
    import pyarrow as pa

    return pa.types.is_string(column.type) or pa.types.is_large_string(column.type)


def _parsed(path: Path, columns: dict[str, Any], base: str, data: bytes) -> Parsed:
    """The rows in store order: sorted by path (two equal paths then side by side), then
    stably by split and class."""
    import pyarrow as pa
    import pyarrow.compute as pc

    raw_paths, raw_labels = columns["path"], columns["label"]
    _check_cells(path, raw_paths, raw_labels, b"\0" in data)
    if data.isascii():  # the faster trim, exact on ASCII text
        paths, labels = (pc.ascii_trim(c, WHITESPACE[:10]) for c in (raw_paths, raw_labels))
    else:
        paths, labels = (pc.utf8_trim(c, WHITESPACE) for c in (raw_paths, raw_labels))
    paths = _relative_paths(paths, base, path, data)
    empty = pc.index(labels, "").as_py()
    if empty >= 0:
        raise UsageError(
            f"manifest {path} has a row with an empty label ({shown(paths[empty].as_py())})."
        )
    splits = _split_codes(path, columns.get("split"), paths)
    class_names = tuple(sorted(pc.unique(labels).to_pylist()))
    codes = pc.index_in(labels, value_set=pa.array(class_names, pa.large_string()))
    codes = codes.to_numpy().astype(np.int32)
    by_path = pc.sort_indices(paths).to_numpy()
    in_order = paths.take(by_path)
    if len(paths) > 1 and pc.any(pc.equal(in_order[1:], in_order[:-1])).as_py():
        check_duplicates(path, base, paths.to_pylist())  # names the row listed twice
    group = (splits.astype(np.int64) * len(class_names) + codes)[by_path]
    index = by_path[np.argsort(group, kind="stable")]
    order = pa.array(index)
    folders = pc.unique(pc.replace_substring_regex(paths, r"(^|/)[^/]*$", ""))
    notes: list[str] = []
    meta = {}
    for name, column in columns.items():
        if name in ("path", "label", "split"):
            continue
        values = _metadata(path, name, column.take(order), notes)
        if values is not None:
            meta[name] = values
    return Parsed(
        class_names,
        paths.take(order).to_numpy(zero_copy_only=False).astype(object, copy=False),
        codes[index],
        splits[index],
        meta,
        tuple(folders.to_pylist()),
        tuple(notes),
        b"://" in data and bool(pc.any(pc.match_substring(paths, "://")).as_py()),
    )


def _check_cells(path: Path, paths, labels, nul: bool) -> None:
    import pyarrow.compute as pc

    distinct = [v for v in pc.unique(labels).to_pylist() if v is not None]
    if (
        labels.null_count
        or (nul and pc.any(pc.match_substring(paths, "\x00")).as_py())
        or not all(v.isprintable() for v in distinct)
    ):
        check_cells(path, paths.to_pylist(), labels.to_pylist())  # names the row


def _relative_paths(paths, base: str, manifest: Path, data: bytes):
    """The paths as stored: those `relative_path` would change, changed one by one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if hasattr(paths, "combine_chunks"):
        paths = paths.combine_chunks()
    if b"//" in data or b"/." in data:
        marked = pc.match_substring_regex(paths, NOT_NORMAL)
    else:  # then only a path's ends can mark it
        marked = pc.or_(
            pc.or_(pc.starts_with(paths, "/"), pc.starts_with(paths, ".")),
            pc.or_(pc.ends_with(paths, "/"), pc.equal(paths, "")),
        )
    changed = np.flatnonzero(marked.to_numpy(zero_copy_only=False))
    if not len(changed):
        return paths
    values = paths.to_numpy(zero_copy_only=False).astype(object, copy=False)
    for i in changed.tolist():
        values[i] = relative_path(values[i], base, manifest)
    return pa.array(values, type=pa.large_string())


def _split_codes(path: Path, column, paths) -> np.ndarray:
    """Each row's split as its code in SPLIT_ORDER."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column is None:
        return np.full(len(paths), SPLIT_ORDER[UNSPLIT], dtype=np.int8)
    distinct = pc.unique(column).to_pylist()
    named = [SPLIT_DIRS.get(str(v).strip().lower()) for v in distinct]
    if None in named:  # names the first row of an unknown split
        split_names(path, column.to_pylist(), paths.to_pylist())
    codes = np.array([SPLIT_ORDER[s] for s in named], dtype=np.int8)
    where = pc.index_in(column, value_set=pa.array(distinct, column.type))
    return codes[where.to_numpy()]


def _metadata(path: Path, name: str, column, notes: list[str]) -> np.ndarray | None:
    """A metadata column as `metadata_values` gives it; None for bytes, which are left out
    with a note."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        notes.append(bytes_note(path, name))
        return None
    if not column.null_count:
        if pa.types.is_floating(kind) or pa.types.is_signed_integer(kind):
            return column.to_numpy()
        if _text(column):
            if not pc.any(pc.match_substring(column, "_")).as_py():
                trimmed = pc.utf8_trim(column, " \t\n\f\r")
                for pattern, target in ((INT, pa.int64()), (FLOAT, pa.float64())):
                    if pc.all(pc.match_substring_regex(column, pattern)).as_py():
                        try:
                            return pc.cast(trimmed, target).to_numpy()
                        except pa.ArrowInvalid:
                            break
            return _as_array(metadata_values(column.to_pylist()))
    return _as_array(metadata_values(column.to_pylist()))


def _as_array(values: tuple) -> np.ndarray:
    if all(isinstance(v, str) for v in values):
        return np.array(values, dtype=object)
    return np.array(values)
