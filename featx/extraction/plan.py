"""What one extraction will compute and how its store is identified: the work items (rows),
the augmented views, int8's calibration images, and the identity a store is checked against."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from featx.data.folders import UNSPLIT, ImageFolder
from featx.data.preprocessing import Preprocessing
from featx.extraction.shard import shard_files
from featx.inference.images import Images

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from featx.backbones.registry import Backbone
    from featx.inference.engine import Calibration
    from featx.store.feature_store import FeatureStore

__all__ = [
    "AUGMENTED_SPLITS",
    "AugmentedViews",
    "Work",
    "augmentation",
    "calibration_images",
    "differences",
    "identity",
    "upgraded_run",
]

AUGMENTED_SPLITS = ("train", UNSPLIT)


@dataclass(frozen=True)
class Work:
    """The rows to compute: (file index, view) pairs in store order."""

    items: list[tuple[int, int]]
    shard: dict[str, int] | None = None  # where the items sit among the whole dataset's

    @classmethod
    def plan(cls, folder: ImageFolder, views: int, shard: tuple[int, int] | None = None) -> Work:
        files = shard_files(len(folder.files), shard) if shard else range(len(folder.files))
        items, first_row, n_rows_total = [], 0, 0
        for index, f in enumerate(folder.files):
            n = 1 + (views if f.split in AUGMENTED_SPLITS else 0)
            if index in files:
                items.extend((index, view) for view in range(n))
            elif index < files.start:
                first_row += n
            n_rows_total += n
        if shard is None:
            return cls(items)
        return cls(
            items,
            {
                "index": shard[0],
                "count": shard[1],
                "first_row": first_row,  # rows are work items: a store row unless skipped
                "n_rows": len(items),
                "n_rows_total": n_rows_total,
                "first_file": files.start,
                "n_files": len(files),
            },
        )

    def images(self, folder: ImageFolder, preprocessing: Preprocessing, views) -> Images:
        """The dataset that decodes these items (`views`: `AugmentedViews` or None)."""
        paths = [f.path for f in folder.files]
        return Images(paths, preprocessing, root=folder.root, items=self.items, transform=views)


@dataclass(frozen=True)
class AugmentedViews:
    """View 0 of a file is its preprocessed image; view v > 0 is augmented, the same way in
    every run and worker, at the network's input size (far cheaper than on a full photo)."""

    preprocessing: Preprocessing
    augmenter: Any
    seed: int

    def __call__(self, image: Image.Image, file_index: int, view: int) -> torch.Tensor:
        from featx.data.augment import view_seed

        if not view:
            return self.preprocessing(image)
        seed = view_seed(self.seed, file_index, view)
        return self.preprocessing(image, lambda im: self.augmenter(im, seed))


def augmentation(
    views: int, config: Any, seed: int, preprocessing: Preprocessing
) -> tuple[AugmentedViews | None, dict | None]:
    """The transform of augmented views and what the store records of them (None without)."""
    if not views:
        return None, None
    from featx.data.augment import AugmentConfig, Augmenter

    config = config or AugmentConfig()
    return AugmentedViews(preprocessing, Augmenter(config), seed), {
        "views": views,
        "seed": seed,
        "config": config.to_dict(),
    }


def calibration_images(folder: ImageFolder, preprocessing: Preprocessing, seed: int) -> Calibration:
    """int8's calibration images: up to CALIBRATION_IMAGES of the training images (of all the
    images when there is no train split), chosen with `seed`, preprocessed as extraction does,
    without augmentation. Shards of one dataset choose the same images."""
    from featx.inference.engine import CALIBRATION_IMAGES, Calibration

    train = [i for i, f in enumerate(folder.files) if f.split in AUGMENTED_SPLITS]
    candidates = train or list(range(len(folder.files)))
    n = min(len(candidates), CALIBRATION_IMAGES)
    chosen = np.random.default_rng(seed).choice(candidates, size=n, replace=False)
    images = Work([(int(i), 0) for i in np.sort(chosen)]).images(folder, preprocessing, None)

    def batches():
        import torch

        for begin in range(0, len(images), 32):
            tensors = [images[i][1] for i in range(begin, min(begin + 32, len(images)))]
            tensors = [x for x in tensors if x is not None]  # unreadable files
            if tensors:
                yield torch.stack(tensors)

    name = json.dumps(
        [folder.fingerprint, preprocessing.to_dict(), seed, n], sort_keys=True, default=str
    )
    return Calibration(batches, n, seed, hashlib.sha256(name.encode()).hexdigest()[:16])


def identity(
    backbone: Backbone,
    weights: str,
    preprocessing: Preprocessing,
    folder: ImageFolder,
    augment: dict | None,
    shard: dict | None,
) -> dict[str, Any]:
    """What makes a store the store it is; a store that differs in any of these is refused."""
    wanted = {
        "backbone": backbone.name,
        "weights": backbone.weights_identity(weights),
        "preprocessing": preprocessing.to_dict(),
        "dataset_fingerprint": folder.fingerprint,
        "augment": augment,
        "shard": shard,
    }
    return json.loads(json.dumps(wanted))  # as it reads back from a store: lists, not tuples


def differences(
    stored: dict[str, Any], wanted: dict[str, Any], folder: ImageFolder, store: FeatureStore
) -> list[str]:
    """How the store's identity differs from the one wanted, one phrase each."""
    out = []
    for name in ("backbone", "weights", "augment", "shard"):
        if stored.get(name) != wanted[name]:
            out.append(f"{name} is {stored.get(name)} in the store, {wanted[name]} now")
    old = Preprocessing.from_dict(stored["preprocessing"])
    new = Preprocessing.from_dict(wanted["preprocessing"])
    if old != new:  # as objects: a store from before a field existed reads with its default
        out.append(f"preprocessing is {old.describe()} in the store, {new.describe()} now")
    if stored["dataset"]["fingerprint"] != wanted["dataset_fingerprint"]:
        out.append(_dataset_change(store, folder))
    return out


def _dataset_change(store: FeatureStore, folder: ImageFolder) -> str:
    old = store.files()
    new = {f.path: (f.size, f.mtime_ns) for f in folder.files}
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    changed = sorted(p for p in new.keys() & old.keys() if new[p] != old[p])
    parts = [
        f"{len(v)} {what} (e.g. {v[0]})"
        for what, v in (("added", added), ("removed", removed), ("modified", changed))
        if v
    ]
    return "the dataset's files changed since extraction: " + (
        ", ".join(parts) or "renamed classes"
    )


def upgraded_run(before: dict[str, Any]) -> dict[str, Any]:
    """An interrupted run's run.json as this version records it: one written before the
    decode policy was recorded decoded every image at full size."""
    preprocessing = before.get("identity", {}).get("preprocessing")
    if isinstance(preprocessing, dict):
        preprocessing.setdefault("decode", "full")
    return before
