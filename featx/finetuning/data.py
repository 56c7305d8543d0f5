"""The images of a fine-tuning run: the train/validation split, seeded augmented views and
the batches of each epoch."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from featx.data.augment import AugmentConfig, Augmenter, view_seed
from featx.data.folders import (
    UNSPLIT,
    BadImage,
    ImageFile,
    ImageFolder,
)
from featx.data.preprocessing import Preprocessing
from featx.errors import UsageError
from featx.finetuning.config import FinetuneConfig
from featx.inference.images import collate, open_images

__all__ = ["Split", "TrainingData", "mix_seed", "training_split"]


# ---- the split --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Indices into `folder.files` of the training and validation images, and their origin."""

    train: tuple[int, ...]
    validation: tuple[int, ...]
    how: str


def training_split(folder: ImageFolder, val_fraction: float, seed: int) -> Split:
    """Train/validation from the folder's splits; without a validation folder, a seeded,
    stratified `val_fraction` of the training (or unsplit) images is held out."""
    by_split: dict[str, list[int]] = {}
    for i, f in enumerate(folder.files):
        by_split.setdefault(f.split, []).append(i)
    pool = by_split.get("train") or by_split.get(UNSPLIT)
    if not pool:
        raise UsageError(
            f"the dataset in {folder.root} has no training images: a folder needs "
            "DATA/train/CLASS/ or DATA/CLASS/, a manifest rows of the train split or no split "
            "column."
        )
    if by_split.get("validation"):
        return Split(tuple(pool), tuple(by_split["validation"]), "validation folder")
    rng = np.random.default_rng(seed)
    labels = np.array([folder.files[i].label for i in pool])
    pool_arr = np.array(pool)
    held: list[int] = []
    for label in np.unique(labels):
        members = pool_arr[labels == label]
        if len(members) < 2:
            continue
        n = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        held.extend(rng.permutation(members)[:n].tolist())
    if not held:
        raise UsageError(
            f"the dataset in {folder.root} has too few images to hold out a validation split; "
            "add images, a validation/ folder or a manifest's validation rows."
        )
    held_set = set(held)
    train = tuple(i for i in pool if i not in held_set)
    how = f"seeded stratified split: {val_fraction:g} of the training images, seed {seed}"
    return Split(train, tuple(sorted(held)), how)


@dataclass(frozen=True)
class ImageTransform:
    """Image -> input tensor through the backbone's preprocessing; with a seed, augmented at
    the network's input size."""

    preprocessing: Preprocessing
    augment: AugmentConfig | None = None

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        if seed is None or self.augment is None:
            return self.preprocessing(image)
        augmenter = Augmenter(self.augment)
        return self.preprocessing(image, lambda im: augmenter(im, seed))


class _Images(Dataset):
    """Items are (position, epoch): epoch None gives the plain image, else an augmented view
    seeded by (seed, file index, epoch). Each is (position, tensor, None), or (position, None,
    reason) for a file that cannot be decoded, as `featx.inference.collate` batches them."""

    def __init__(
        self,
        root: Path,
        files: Sequence[ImageFile],
        index: Sequence[int],
        transform: ImageTransform,
        seed: int,
    ):
        self.root, self.files, self.index = root, files, list(index)
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int | None]):
        position, epoch = item
        file_index = self.index[position]
        f = self.files[file_index]
        try:
            image = self.transform.preprocessing.load(self.root / f.path)
        except BadImage as bad:
            return position, None, str(bad)
        seed = None if epoch is None else view_seed(self.seed, file_index, epoch)
        return position, self.transform(image, seed), None

    def labels(self, positions: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self.files[self.index[p]].label for p in positions], dtype=torch.long)

    def path(self, position: int) -> str:
        return self.files[self.index[position]].path


class _EpochBatches:
    """Shuffled batches of (position, epoch) for `epoch`, seeded by (seed, epoch); a final
    batch of one image is dropped when BatchNorm trains (it cannot normalise one sample)."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_single: bool):
        self.n, self.batch_size, self.seed, self.drop_single = n, batch_size, seed, drop_single
        self.epoch = 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1))
        order = torch.randperm(self.n, generator=g).tolist()
        for start in range(0, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) == 1 and self.drop_single and self.n > 1:
                return
            yield [(p, self.epoch) for p in batch]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not (rest == 1 and self.drop_single and self.n > 1) else 0)


class _InOrder:
    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def __iter__(self):
        for start in range(0, self.n, self.batch_size):
            yield [(p, None) for p in range(start, min(self.n, start + self.batch_size))]

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers."""
    return int(
        np.random.SeedSequence([p & (2**63 - 1) for p in parts]).generate_state(2, np.uint64)[0]
    ) & (2**63 - 1)


class TrainingData:
    """The images of a fine-tuning run: the folder, its train/validation split, seeded
    (augmented) training batches per epoch, validation batches in order, and the files that
    could not be read."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        config: FinetuneConfig,
        preprocessing: Preprocessing,
        workers: int,
        pin_memory: bool,
        merge_validation: bool = False,
    ):
        """`merge_validation`: the validation images train too (they stay the validation
        images as well, for the record)."""
        self.folder = open_images(data_dir)
        self.class_names = list(self.folder.class_names)
        if len(self.class_names) < 2:
            raise UsageError(
                f"the dataset in {self.folder.root} has one class; fine-tuning needs at least two."
            )
        self.split = training_split(self.folder, config.val_fraction, config.seed)
        if merge_validation:
            split = self.split
            train = tuple(sorted((*split.train, *split.validation)))
            how = f"{split.how}; trained on train + validation"
            self.split = Split(train, split.validation, how)
        self.batch_size, self.workers, self.pin_memory = config.batch_size, workers, pin_memory
        transform = ImageTransform(preprocessing, config.augment)
        root, files = self.folder.root, self.folder.files
        self.train_images = _Images(root, files, self.split.train, transform, config.seed)
        self.val_images = _Images(root, files, self.split.validation, transform, config.seed)
        test = [i for i, f in enumerate(files) if f.split == "test"]
        self.test_images = _Images(root, files, test, transform, config.seed) if test else None
        self.seed = config.seed
        self.train_batches = _EpochBatches(
            len(self.train_images), config.batch_size, config.seed, config.bn == "train"
        )
        self._loaders: dict[str, DataLoader] = {}
        # A DataLoader iterator draws its base seed from its generator, or from torch's global
        # one (which also drives dropout) when it has none; persistent workers draw it only
        # once. Each loader gets its own generator, reseeded per epoch, so the global stream
        # and the run are the same whatever the worker count.
        self._generators: dict[str, torch.Generator] = {}
        self.skipped: dict[str, str] = dict(self.folder.skipped)

    def images(self, which: str) -> _Images | None:
        """The train, validation or test images (None: the dataset has no test split)."""
        return {"train": self.train_images, "validation": self.val_images}.get(
            which, self.test_images
        )

    def loader(self, which: str) -> DataLoader:
        if which not in self._loaders:
            dataset = self.images(which)
            sampler = (
                self.train_batches if which == "train" else _InOrder(len(dataset), self.batch_size)
            )
            self._generators[which] = torch.Generator()
            self._loaders[which] = DataLoader(
                dataset,
                batch_sampler=sampler,
                num_workers=self.workers,
                collate_fn=collate,
                pin_memory=self.pin_memory,
                persistent_workers=self.workers > 0,
                prefetch_factor=2 if self.workers else None,
                generator=self._generators[which],
            )
        return self._loaders[which]

    def batches(self, which: str, epoch: int | None = None):
        """(x, y) batches of the training images for `epoch`, or of the validation or test
        images; unreadable files are noted in `skipped`."""
        if epoch is not None:
            self.train_batches.epoch = epoch
        loader, images = self.loader(which), self.images(which)
        self._generators[which].manual_seed(mix_seed(self.seed, epoch or 0, 3))
        for positions, x, bad in loader:
            for position, reason in bad:
                self.skipped.setdefault(images.path(position), reason)
            if x is not None:
                yield x, images.labels(positions)

    def class_weights(self) -> np.ndarray:
        """Balanced class weights of the training images: n / (classes * count)."""
        labels = np.array([self.folder.files[i].label for i in self.split.train])
        counts = np.bincount(labels, minlength=len(self.class_names)).astype(np.float64)
        return np.divide(
            len(labels), len(self.class_names) * counts, out=np.zeros_like(counts), where=counts > 0
        )

    def close(self) -> None:
        self._loaders.clear()
