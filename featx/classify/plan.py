"""What `featx fit` was asked, checked before any work, and how each layer is trained.

Memory. A layer is read into memory once and shared by every classifier. When its rows would
need more than the memory budget (about `IN_MEMORY_COPIES` float32 copies; by default half of
the memory available when fit starts), or when `stream=True`, it is trained out-of-core instead:
StandardScaler and IncrementalPCA learn with partial_fit over row chunks, then a streaming
classifier (`sgd`, `mlp`) takes partial_fit passes over block-shuffled chunks, with early
stopping on the validation rows (loss for mlp, accuracy for sgd, as their scikit-learn
counterparts do). Peak memory then depends on the chunk size (`chunk_bytes`), not on the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import ParameterGrid

from featx.classify.fit_settings import FitSettings
from featx.classify.pipeline import PipelineConfig
from featx.classify.registry import (
    as_param_specs,
    check_params,
    classifier_spec,
    param_grids,
    streaming_classifiers,
)
from featx.classify.selection import Selection
from featx.errors import UsageError
from featx.runtime import available_memory, human_size
from featx.settings import check_settings
from featx.store.feature_store import FeatureStore
from featx.store.rows import LAYER_JOIN

__all__ = [
    "FitRequest",
    "check_pool",
    "default_memory_budget",
    "plan_layer",
    "resolve_layer",
]

IN_MEMORY_COPIES = 3  # the rows as stored, their float32 features, the scaled features
MEMORY_FRACTION = 0.5  # default budget: this share of the memory available at start


def default_memory_budget() -> int:
    """Half the memory available now."""
    return int(available_memory() * MEMORY_FRACTION)


def resolve_layer(store: FeatureStore, layer: str) -> str:
    """The store key of a layer, or the `+`-joined keys of several (each at most once)."""
    keys = [store.resolve(part.strip()) for part in layer.split(LAYER_JOIN)]
    if len(set(keys)) != len(keys):
        raise UsageError(f"--layer {layer} names the same stored layer twice.")
    return LAYER_JOIN.join(keys)


@dataclass(frozen=True)
class FitRequest:
    """What `fit` was asked to do, checked before any store is opened: the settings, and what
    they resolve to (each classifier's grid, the pipeline, the memory budget)."""

    settings: FitSettings
    grids: dict[str, dict[str, list[Any]]]
    config: PipelineConfig
    budget: int

    @classmethod
    def checked(cls, settings: FitSettings) -> FitRequest:
        """UsageError naming the first option that cannot work."""
        check_settings(settings)
        if not settings.layers:
            raise UsageError("give at least one --layer; `featx info STORE` lists them.")
        if not settings.classifiers:
            raise UsageError("give at least one --clf.")
        for name in settings.classifiers:
            classifier_spec(name)
        grids = param_grids(settings.classifiers, as_param_specs(settings.params))
        for name, grid in grids.items():
            estimator = classifier_spec(name).estimator(settings.seed)
            for point in ParameterGrid(grid):
                check_params(estimator, point, name)
        s = settings
        return cls(
            settings,
            grids,
            PipelineConfig(s.pool or "none", s.scale, s.pca, s.l2),
            default_memory_budget() if s.memory_budget is None else s.memory_budget,
        )


def check_pool(store: FeatureStore, key: str, pool: str) -> None:
    if pool == "none":
        return
    info = store.layer(key)
    if len(info.shape) != 3:
        stored = info.attrs.get("pool", "none")
        shape = "x".join(map(str, info.shape))
        why = (
            f"was pooled ({stored}) at extraction" if stored != "none" else "is not a C x H x W map"
        )
        raise UsageError(
            f"--pool {pool} needs a spatial map, but layer {key} has rows of shape {shape} "
            f"(it {why}); drop --pool."
        )


def plan_layer(
    store: FeatureStore, key: str, selection: Selection, request: FitRequest
) -> tuple[str, bool]:
    """(key, streamed) for a layer; UsageError when it must stream but cannot."""
    config, stream, cv = request.config, request.settings.stream, request.settings.cv
    budget, chunk_bytes = request.budget, request.settings.chunk_bytes
    classifiers = request.settings.classifiers
    shapes = [store.layer(part).shape for part in key.split(LAYER_JOIN)]
    n_rows = len(selection.train) + (
        len(selection.validation) if selection.validation is not None else 0
    )
    n_values = sum(int(np.prod(shape)) for shape in shapes)
    need = n_rows * n_values * 4 * IN_MEMORY_COPIES
    streamed = stream if stream is not None else need > budget
    if len(shapes) > 1:
        pool = "avg" if config.pool == "none" else config.pool
        n_features = sum(
            s[0] * (2 if pool == "avgmax" else 1) if len(s) == 3 else int(np.prod(s))
            for s in shapes
        )
    else:
        n_features = (
            n_values
            if config.pool == "none"
            else shapes[0][0] * (2 if config.pool == "avgmax" else 1)
        )
    if streamed:  # IncrementalPCA learns from one chunk at a time
        smallest, what = max(1, chunk_bytes // max(1, n_values * 4)), "rows in a chunk"
    elif selection.folds:
        smallest, what = min(len(t) for t, _ in selection.folds), "training rows in a fold"
    else:
        smallest, what = len(selection.train), "training rows"
    if config.pca and config.pca > min(smallest, n_features, len(selection.train)):
        raise UsageError(
            f"--pca {config.pca} is more than layer {key} allows: it has {n_features} features "
            f"and {min(smallest, len(selection.train))} {what}"
            + ("; raise --chunk-mb or lower --pca." if streamed else ".")
        )
    if not streamed:
        return key, False
    if len(shapes) > 1:
        raise UsageError(
            f"layer {key} joins several layers, which are fitted in memory only, but "
            + (
                "--stream was given."
                if stream
                else f"it needs about {human_size(need)}, more than the memory budget of "
                f"{human_size(budget)}; raise --memory-budget or join pooled layers."
            )
        )
    why = (
        "--stream was given"
        if stream
        else (
            f"layer {key} needs about {human_size(need)} in memory, more than the memory budget of "
            f"{human_size(budget)}"
        )
    )
    if cv is not None:
        raise UsageError(
            f"{why}, and a streamed fit cannot cross-validate; drop --cv to score on the "
            "validation rows" + ("." if stream else ", or raise --memory-budget.")
        )
    cannot = [name for name in classifiers if not classifier_spec(name).streams]
    if cannot:
        raise UsageError(
            f"{why}, but only {' and '.join(streaming_classifiers())} can train out-of-core, "
            f"not {', '.join(cannot)}"
            + ("." if stream else "; raise --memory-budget, or pool or select a smaller layer.")
        )
    return key, True
