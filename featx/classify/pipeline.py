"""The scikit-learn pipeline around a classifier: stored layer rows pooled or flattened,
standardised, optionally reduced by PCA and L2-normalised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA, IncrementalPCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from featx.backbones.registry import POOLS

__all__ = ["ConcatLayers", "LayerFeatures", "PipelineConfig", "build_pipeline"]


# ---- the pipeline ------------------------------------------------------------------------
class LayerFeatures(TransformerMixin, BaseEstimator):
    """Stored layer rows -> a float32 matrix of shape (n_samples, n_features).

    Rows of shape (C, H, W) are averaged (`pool="avg"`), maxed (`"max"`) or both concatenated
    (`"avgmax"`) over H and W; with `pool="none"` every row is flattened. Float16 rows are
    computed on in float32.

    Parameters
    ----------
    pool : {"none", "avg", "max", "avgmax"}, default="none"
        How spatial maps become vectors.

    Attributes
    ----------
    row_shape_ : tuple of int
        Shape of one input row seen in `fit`.
    n_features_out_ : int
        Width of the output matrix.
    """

    def __init__(self, pool: str = "none"):
        self.pool = pool

    def fit(self, X, y=None) -> LayerFeatures:
        """Record the row shape of `X`."""
        X = self._check(X)
        self.row_shape_ = tuple(X.shape[1:])
        self.n_features_out_ = self._out(X[:1]).shape[1]
        return self

    def transform(self, X) -> np.ndarray:
        """Pool or flatten `X`, which must have the row shape seen in `fit`."""
        X = self._check(X)
        if tuple(X.shape[1:]) != self.row_shape_:
            raise ValueError(
                f"rows of shape {tuple(X.shape[1:])} given, {self.row_shape_} expected."
            )
        return self._out(X)

    def _check(self, X) -> np.ndarray:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}.")
        X = np.asarray(X)
        if X.ndim < 2:
            raise ValueError(f"expected rows of features, got an array of shape {X.shape}.")
        if self.pool != "none" and X.ndim != 4:
            raise ValueError(f"pool={self.pool!r} needs C x H x W rows, got {X.shape[1:]}.")
        return X

    def _out(self, X: np.ndarray) -> np.ndarray:
        if self.pool == "none":
            return X.reshape(len(X), -1).astype(np.float32, copy=False)
        parts = []
        if self.pool in ("avg", "avgmax"):
            parts.append(X.mean(axis=(2, 3), dtype=np.float32))
        if self.pool in ("max", "avgmax"):
            parts.append(X.max(axis=(2, 3)).astype(np.float32))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


class ConcatLayers(TransformerMixin, BaseEstimator):
    """Rows of several stored layers, flattened and concatenated (`featx.store.ConcatRows`)
    -> each layer pooled like `LayerFeatures` (spatial maps by `pool`, "avg" when it is
    "none"; vectors as they are), standardised on its own, then concatenated.

    Parameters
    ----------
    row_shapes : tuple of tuple of int
        The stored row shape of each layer, in the order of the columns.
    pool : {"none", "avg", "max", "avgmax"}, default="avg"
        How the spatial maps among the layers become vectors.

    Attributes
    ----------
    layers_ : list of (LayerFeatures, StandardScaler)
        The fitted steps of each layer.
    n_features_out_ : int
        Width of the output matrix.
    """

    def __init__(self, row_shapes: tuple[tuple[int, ...], ...] = (), pool: str = "avg"):
        self.row_shapes = row_shapes
        self.pool = pool

    def _parts(self, X) -> list[np.ndarray]:
        X = np.asarray(X)
        sizes = [int(np.prod(shape)) for shape in self.row_shapes]
        if X.ndim != 2 or X.shape[1] != sum(sizes):
            raise ValueError(
                f"expected rows of {sum(sizes)} concatenated values, got shape {X.shape}."
            )
        bounds = np.cumsum([0, *sizes])
        return [
            X[:, lo:hi].reshape(len(X), *shape)
            for lo, hi, shape in zip(bounds[:-1], bounds[1:], self.row_shapes, strict=True)
        ]

    def fit(self, X, y=None) -> ConcatLayers:
        """Fit each layer's pooling and scaler."""
        spatial_pool = "avg" if self.pool == "none" else self.pool
        self.layers_ = []
        for part, shape in zip(self._parts(X), self.row_shapes, strict=True):
            features = LayerFeatures(spatial_pool if len(shape) == 3 else "none").fit(part)
            scaler = StandardScaler().fit(features.transform(part))
            self.layers_.append((features, scaler))
        self.n_features_out_ = sum(f.n_features_out_ for f, _ in self.layers_)
        return self

    def transform(self, X) -> np.ndarray:
        """Pool, standardise and concatenate each layer's part of `X`."""
        return np.concatenate(
            [
                scaler.transform(features.transform(part)).astype(np.float32)
                for part, (features, scaler) in zip(self._parts(X), self.layers_, strict=True)
            ],
            axis=1,
        )


@dataclass(frozen=True)
class PipelineConfig:
    """The steps around the classifier."""

    pool: str = "none"  # applied to stored spatial maps at fit time
    scale: bool = True
    pca: int | None = None
    l2: bool = False

    def describe(self, n_layers: int = 1) -> str:
        if n_layers > 1:
            pool = "avg" if self.pool == "none" else self.pool
            steps = [f"{n_layers} layers: {pool}-pool maps, standardise each layer, concatenate"]
        else:
            steps = ["flatten" if self.pool == "none" else f"{self.pool}-pool"]
        if self.scale:
            steps.append("standardise")
        if self.pca:
            steps.append(f"PCA({self.pca})")
        if self.l2:
            steps.append("L2-normalise")
        return " -> ".join(steps)


def build_pipeline(
    classifier: BaseEstimator,
    config: PipelineConfig,
    seed: int = 0,
    streamed: bool = False,
    row_shapes: Sequence[tuple[int, ...]] | None = None,
) -> Pipeline:
    """features -> [scale] -> [pca] -> [l2] -> clf. `streamed` uses IncrementalPCA, whose
    partial_fit learns from chunks (StandardScaler and Normalizer need no other variant).
    `row_shapes` of several layers makes the features step `ConcatLayers`."""
    features = (
        ConcatLayers(tuple(map(tuple, row_shapes)), config.pool)
        if row_shapes is not None and len(row_shapes) > 1
        else LayerFeatures(config.pool)
    )
    steps: list[tuple[str, Any]] = [("features", features)]
    if config.scale:
        steps.append(("scale", StandardScaler()))
    if config.pca:
        steps.append(
            ("pca", IncrementalPCA(config.pca) if streamed else PCA(config.pca, random_state=seed))
        )
    if config.l2:
        steps.append(("l2", Normalizer()))
    steps.append(("clf", classifier))
    return Pipeline(steps)
