"""A Hugging Face `datasets` dataset saved with `save_to_disk`, read with pyarrow alone.

A `Dataset` folder holds `state.json` (its Arrow stream files) and `dataset_info.json` (its
features, among them the `ClassLabel` names of `label`); a `DatasetDict` folder holds
`dataset_dict.json` and one such folder per split. The image column is the `Image` feature
(`{bytes, path}`); rows are named `[SPLIT/]FILE/ROW`.
"""

from __future__ import annotations

import json
from pathlib import Path

from featx.data.folders import SPLIT_DIRS, UNSPLIT, ImageFolder
from featx.data.sources.base import Row, build_dataset, split_of
from featx.data.sources.location import PackedRoot
from featx.data.sources.parquet_images import (
    TableReader,
    class_label_names,
    class_order,
    image_column,
    named_classes,
    table_rows,
)
from featx.errors import UsageError

__all__ = ["is_saved_dataset", "read_saved_dataset"]


def is_saved_dataset(path: str | Path) -> bool:
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"{path} cannot be read ({error}).") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not a JSON object.")
    return value


def _split(folder: Path, reader: TableReader, prefix: str, split: str):
    """(rows, metadata, class names) of one saved `Dataset` folder."""
    import pyarrow as pa

    state = _json(folder / "state.json")
    info = _json(folder / "dataset_info.json") if (folder / "dataset_info.json").is_file() else {}
    files = [f.get("filename") for f in state.get("_data_files", []) if isinstance(f, dict)]
    if not files or not all(isinstance(f, str) and "/" not in f for f in files):
        raise UsageError(f"{folder / 'state.json'} lists no Arrow data files.")
    rows, meta = [], {}
    for filename in files:
        path = folder / filename
        try:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (OSError, ValueError) as error:
            raise UsageError(f"{path} is not a readable Arrow file ({error}).") from None
        column = image_column(table.schema)
        if column is None:
            raise UsageError(f"{path} has no image column (a Hugging Face Image feature).")
        if reader.column and column != reader.column:
            raise UsageError(f"{folder} keeps its images in {column}, not {reader.column}.")
        reader.column = column
        name = f"{prefix}{filename}"
        reader.files[name] = str(path)
        part, part_meta = table_rows(table, name, column, str(path), split)
        rows.extend(part)
        for key, values in part_meta.items():
            meta.setdefault(key, []).extend(values)
    return rows, meta, class_label_names(info.get("features"))


def read_saved_dataset(path: str | Path) -> ImageFolder:
    """The dataset of a `save_to_disk` folder (a Dataset or a DatasetDict)."""
    path = Path(path)
    reader = TableReader({}, "", arrow=True)
    if (path / "dataset_dict.json").is_file():
        splits = _json(path / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not splits:
            raise UsageError(f"{path / 'dataset_dict.json'} lists no splits.")
        parts = []
        for name in splits:
            if str(name).lower() not in SPLIT_DIRS or not (path / str(name)).is_dir():
                raise UsageError(
                    f"{path} has the split {name!r}; featx reads train, "
                    "validation (or val) and test."
                )
            split = split_of(name, str(path))
            parts.append(_split(path / str(name), reader, f"{name}/", split))
    else:
        state = _json(path / "state.json")
        split = str(state.get("_split") or "").lower()
        parts = [
            _split(path, reader, "", split_of(split, str(path)) if split in SPLIT_DIRS else UNSPLIT)
        ]
    rows: list[Row] = []
    meta: dict[str, list] = {}
    for part_rows, part_meta, _ in parts:
        rows.extend(part_rows)
        for key, values in part_meta.items():
            meta.setdefault(key, []).extend(values)
    meta = {k: v for k, v in meta.items() if len(v) == len(rows)}
    names = next((n for _, _, n in parts if n is not None), None)
    rows = named_classes(rows, names, str(path))
    root = PackedRoot(str(path.resolve()), reader)
    return build_dataset(root, rows, class_order(rows, names), meta)
