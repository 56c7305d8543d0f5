"""Which store rows train a classifier and which validate it.

The training rows are the store's `train` split (or, for a dataset without split folders, the
`unsplit` rows). Validation rows are the store's `validation` split when it has one; otherwise
a hold-out of `val_fraction` of the training images, stratified by class and drawn by source
image, so that augmented views of a held-out image are not trained on. With `cv=K`, training
and validation rows together are cut into K stratified folds grouped by source image. Only
original images (view 0) are ever scored; augmented views are only trained on. The test split
is never touched: `featx evaluate` reports it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from featx.errors import UsageError, check_range
from featx.store.feature_store import FeatureStore

__all__ = ["Selection", "select_rows"]


@dataclass(frozen=True)
class Selection:
    """Which store rows train and which validate."""

    train: np.ndarray  # sorted row indices the model is fitted on before refitting
    validation: np.ndarray | None  # sorted row indices scored (view 0); None with CV
    folds: list[tuple[np.ndarray, np.ndarray]] | None  # CV: positions into `train`
    description: str
    pool: str = "train"  # the split the training rows come from ("train" or "unsplit")
    validation_split: bool = False  # the store has a validation split (not a hold-out)
    in_pool: np.ndarray | None = None  # CV: which of `train` are rows of `pool`

    @property
    def default_refit(self) -> str:
        """`train` when the store has a validation split, else `all` (a hold-out or CV folds
        carved out of the training images)."""
        return "train" if self.validation_split else "all"


def select_rows(
    store: FeatureStore, *, cv: int | None = None, val_fraction: float = 0.2, seed: int = 0
) -> Selection:
    """Training and validation rows (or CV folds) of `store`; see the module docstring."""
    splits = store.splits
    pool = "train" if "train" in splits else "unsplit" if "unsplit" in splits else None
    if pool is None:
        raise UsageError(
            f"store {store.path} has no training rows (its splits: {', '.join(splits)}); "
            "fit needs a train split or a dataset without split folders."
        )
    split_of, views = store.split_of_rows(), store.views()
    sources, labels = store.sources(), store.labels()
    _check_labels(store, labels[split_of == pool])
    if cv is not None:
        check_range("cv", cv, 2)
        dev = np.flatnonzero((split_of == pool) | (split_of == "validation"))
        splitter = StratifiedGroupKFold(n_splits=cv, shuffle=True, random_state=seed)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a class smaller than cv
                folds = [
                    (train, test[views[dev[test]] == 0])
                    for train, test in splitter.split(dev, labels[dev], groups=sources[dev])
                ]
        except ValueError as error:
            raise UsageError(f"cannot make {cv} cross-validation folds: {error}") from None
        what = "train and validation" if "validation" in splits else pool
        return Selection(
            dev,
            None,
            folds,
            f"{cv}-fold cross-validation over the {what} rows, stratified by class and "
            f"grouped by source image (seed {seed})",
            pool=pool,
            validation_split="validation" in splits,
            in_pool=split_of[dev] == pool,
        )
    train_rows = np.flatnonzero(split_of == pool)
    if "validation" in splits:
        validation = np.flatnonzero((split_of == "validation") & (views == 0))
        return Selection(
            train_rows,
            validation,
            None,
            "the store's validation split",
            pool=pool,
            validation_split=True,
        )
    check_range("val-fraction", val_fraction, 0, 1, above=True, below=True)
    images, first = np.unique(sources[train_rows], return_index=True)
    image_labels = labels[train_rows][first]
    try:
        _, held = train_test_split(
            images, test_size=val_fraction, stratify=image_labels, random_state=seed
        )
    except ValueError:
        raise UsageError(
            f"cannot hold out {val_fraction:.0%} of the {len(images)} {pool} images with every "
            f"class on both sides ({len(np.unique(image_labels))} classes, smallest has "
            f"{np.bincount(image_labels).min(initial=len(images))} images); change "
            "--val-fraction or use --cv."
        ) from None
    is_held = np.isin(sources[train_rows], held)
    validation = train_rows[is_held & (views[train_rows] == 0)]
    return Selection(
        train_rows[~is_held],
        validation,
        None,
        f"a {val_fraction:.0%} hold-out of the {pool} images, stratified by class and drawn "
        f"by source image (seed {seed})",
        pool=pool,
    )


def _check_labels(store: FeatureStore, labels: np.ndarray) -> None:
    if not store.class_names or len(labels) == 0 or labels.min() < 0:
        raise UsageError(
            f"store {store.path} has no class labels; fit needs images in class folders."
        )
    present = np.unique(labels)
    if len(present) < 2:
        raise UsageError(
            f"store {store.path} has a single class ({store.class_names[present[0]]}) in its "
            "training rows; a classifier needs at least two."
        )
