"""Images into batches: the one dataset every inference pass decodes through, its collate
function, batches that never cross a chunk boundary, and the loader that runs them in decoding
processes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featx.data.folders import BadImage, ImageFolder
from featx.data.manifest import MANIFEST_SUFFIXES, open_dataset
from featx.data.sources import SOURCE_SUFFIXES
from featx.errors import UsageError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from featx.backbones.registry import Preprocessing

__all__ = ["Batches", "Images", "collate", "image_loader", "open_images"]

# transform(image, file index, view) -> the input tensor(s) of that view
Transform = Callable[["Image.Image", int, int], "torch.Tensor"]


def open_images(data: str | os.PathLike) -> ImageFolder:
    """The dataset at `data`, a folder of class folders, a manifest or a packed dataset (tar
    shards, Parquet files of image bytes, a saved Hugging Face dataset), as every command that
    takes images opens it; a single image file is refused saying so."""
    path = Path(data)
    if path.is_file() and path.suffix.lower() not in (*MANIFEST_SUFFIXES, *SOURCE_SUFFIXES):
        raise UsageError(
            f"{path} is a file, not a dataset: give a folder of class folders (DATA/CLASS/*.jpg) "
            f"or a manifest ({', '.join(MANIFEST_SUFFIXES)}); `featx predict` classifies single "
            "images."
        )
    return open_dataset(path)


class Images:
    """A map-style dataset of decoded, preprocessed images. Item i is (i, tensor, None), or
    (i, None, reason) for a file that cannot be decoded.

    `items` names (file index, view) pairs into `paths` (default: file i, view 0, for every
    path); `transform(image, file index, view)` makes the tensor (default: `preprocessing`)."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        preprocessing: Preprocessing,
        *,
        root: Path | None = None,
        items: Sequence[tuple[int, int]] | None = None,
        transform: Transform | None = None,
    ):
        self.paths, self.preprocessing, self.root = paths, preprocessing, root
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items if self.items is not None else self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        file_index, view = self.items[i] if self.items is not None else (i, 0)
        path = self.paths[file_index]
        try:
            image = self.preprocessing.load(self.root / path if self.root else path)
        except BadImage as bad:
            return i, None, str(bad)
        if self.transform is None:
            return i, self.preprocessing(image), None
        return i, self.transform(image, file_index, view), None


def collate(samples) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(indices of the decoded items, their tensors stacked or None, [(index, reason)] of the
    items that could not be decoded)."""
    import torch

    good = [(i, x) for i, x, _ in samples if x is not None]
    bad = [(i, reason) for i, x, reason in samples if x is None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, bad


class Batches:
    """Consecutive batches of item indices from `start` to `stop`, never crossing a multiple
    of `chunk_items` (a chunk saved on its own) when given."""

    def __init__(self, start: int, stop: int, batch_size: int, chunk_items: int | None = None):
        self.start, self.stop, self.batch_size = start, stop, batch_size
        self.chunk_items = chunk_items or max(1, stop)

    def __iter__(self) -> Iterator[list[int]]:
        i = self.start
        while i < self.stop:
            chunk_end = (i // self.chunk_items + 1) * self.chunk_items
            end = min(i + self.batch_size, self.stop, chunk_end)
            yield list(range(i, end))
            i = end

    def __len__(self) -> int:
        return sum(1 for _ in self)


def image_loader(
    images: Images, batches: Batches, workers: int, pin_memory: bool = False, **options: Any
):
    """A DataLoader of `images` in `batches` decoded by `workers` processes (0: in-process);
    `options` go to the DataLoader."""
    from torch.utils.data import DataLoader

    return DataLoader(
        images,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        **options,
    )
