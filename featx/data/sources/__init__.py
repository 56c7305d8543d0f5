"""Datasets packed or remote: WebDataset tar shards, Parquet files of image bytes, Hugging Face
datasets saved to disk and image URLs in manifests, each opened as the same `ImageFolder` as an
image folder of the same images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from featx.data.folders import ImageFolder

__all__ = ["SOURCE_SUFFIXES", "open_source", "with_urls"]

SOURCE_SUFFIXES = (".tar", ".parquet")


def open_source(spec: str | os.PathLike | Sequence, labelled: bool = True) -> ImageFolder | None:
    """The dataset `spec` names when it is tar shards (a path, list, glob or brace notation),
    Parquet files holding image bytes, or a `save_to_disk` folder; None for anything else (an
    image folder or a manifest). Without `labelled`, tar samples need no label (see
    `read_shards`)."""
    from featx.data.sources.hf_disk import is_saved_dataset, read_saved_dataset
    from featx.data.sources.parquet_images import read_parquet_images
    from featx.data.sources.webdataset import read_shards

    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir():
        return read_saved_dataset(spec) if is_saved_dataset(spec) else None
    return read_shards(spec, labelled) or read_parquet_images(spec)


def with_urls(folder: ImageFolder, manifest: str | os.PathLike) -> ImageFolder:
    """A manifest's dataset whose URL rows are read through fsspec."""
    from featx.data.sources.urls import with_urls as attach

    return attach(folder, manifest)
