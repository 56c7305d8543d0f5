"""What one extraction will compute and how its store is identified: the work items (rows),
the augmented views, int8's calibration images, and the identity a store is checked against."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from featx.data.folders import UNSPLIT, ImageFolder
from featx.data.manifest import ManifestFiles, ManifestFolder
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
    "file_column",
    "identity",
    "upgraded_run",
    "views_per_file",
]

AUGMENTED_SPLITS = ("train", UNSPLIT)


@dataclass(frozen=True)
class Work:
    """The rows to compute: (file index, view) pairs in store order."""

    items: list[tuple[int, int]]
    shard: dict[str, int] | None = None  # where the items sit among the whole dataset's

    @classmethod
    def plan(cls, folder: ImageFolder, views: int, shard: tuple[int, int] | None = None) -> Work:
        n_files = len(folder.files)
        files = shard_files(n_files, shard) if shard else range(n_files)
        per_file = views_per_file(folder, views)
        mine = per_file[files.start : files.stop]
        index = np.repeat(np.arange(files.start, files.stop), mine)
        starts = np.cumsum(mine) - mine  # each file's first item among the slice's
        view = np.arange(len(index)) - np.repeat(starts, mine)
        items = list(zip(index.tolist(), view.tolist(), strict=True))
        if shard is None:
            return cls(items)
        return cls(
            items,
            {
                "index": shard[0],
                "count": shard[1],
                # rows are work items: a store row unless skipped
                "first_row": int(per_file[: files.start].sum()),
                "n_rows": len(items),
                "n_rows_total": int(per_file.sum()),
                "first_file": files.start,
                "n_files": len(files),
            },
        )

    def images(self, folder: ImageFolder, preprocessing: Preprocessing, views) -> Images:
        """The dataset that decodes these items (`views`: `AugmentedViews` or None)."""
        paths = file_column(folder, "path")
        return Images(paths, preprocessing, root=folder.root, items=self.items, transform=views)


def file_column(folder: ImageFolder, name: str) -> np.ndarray:
    """The `path`, `label` or `split` of every file of `folder`, without stat()ing any."""
    if isinstance(folder.files, ManifestFiles):
        return folder.files.column(name)
    return np.array([getattr(f, name) for f in folder.files], dtype=object)


def views_per_file(folder: ImageFolder, views: int) -> np.ndarray:
    """The work items of each file: 1 + `views` for a training (or unsplit) image, else 1."""
    splits = file_column(folder, "split")
    return np.where(np.isin(splits, AUGMENTED_SPLITS), 1 + views, 1).astype(np.int64)


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

    train = np.flatnonzero(np.isin(file_column(folder, "split"), AUGMENTED_SPLITS)).tolist()
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
    fingerprint = stored["dataset"]["fingerprint"]
    if fingerprint != wanted["dataset_fingerprint"] and not _listed_before(fingerprint, folder):
        out.append(_dataset_change(store, folder, wanted["shard"]))
    elif isinstance(folder, ManifestFolder):  # the same manifest: are its files the same?
        changed = _changed_files(store.files(), _covered(folder, wanted["shard"]))
        if changed:
            out.append(
                f"{len(changed)} of the dataset's files changed since extraction "
                f"(e.g. {changed[0]})"
            )
    return out


def _listed_before(fingerprint: str, folder: ImageFolder) -> bool:
    """Whether a store fingerprinted by the stat() of every file (as manifests were before
    their content identified them) was made from `folder`'s files as they are."""
    return isinstance(folder, ManifestFolder) and fingerprint == ImageFolder.fingerprint.fget(
        folder
    )


def _covered(folder: ImageFolder, shard: dict | None) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of the files a run covers: a shard's own only."""
    first, n = (shard["first_file"], shard["n_files"]) if shard else (0, len(folder.files))
    return {f.path: (f.size, f.mtime_ns) for f in folder.files[first : first + n]}


def _changed_files(old: dict, new: dict) -> list[str]:
    return sorted(p for p in new.keys() & old.keys() if new[p] != old[p])


def _dataset_change(store: FeatureStore, folder: ImageFolder, shard: dict | None) -> str:
    old, new = store.files(), _covered(folder, shard)
    if shard:  # files outside the shard's slice are not its concern
        old = {p: v for p, v in old.items() if p in new}
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    changed = _changed_files(old, new)
    parts = [
        f"{len(v)} {what} (e.g. {v[0]})"
        for what, v in (("added", added), ("removed", removed), ("modified", changed))
        if v
    ]
    return "the dataset's files changed since extraction: " + (
        ", ".join(parts) or "renamed classes or another manifest"
    )


def upgraded_run(before: dict[str, Any]) -> dict[str, Any]:
    """An interrupted run's run.json as this version records it: one written before the
    decode policy was recorded decoded every image at full size."""
    preprocessing = before.get("identity", {}).get("preprocessing")
    if isinstance(preprocessing, dict):
        preprocessing.setdefault("decode", "full")
    return before
