"""`featx fit`: classifiers trained on stored layers, every layer x classifier combination,
ranked by a validation score. The rows are chosen by `featx.classify.selection`, the request
checked and each layer planned (in memory or out-of-core) by `featx.classify.plan`, each
experiment run by `featx.classify.experiment`, and the results gathered in a
`featx.classify.sweep.Sweep`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from featx.classify.experiment import Experiment, read_rows
from featx.classify.metrics import format_number
from featx.classify.pipeline import PipelineConfig
from featx.classify.plan import (
    REFITS,
    FitRequest,
    check_pool,
    default_memory_budget,
    plan_layer,
    resolve_layer,
)
from featx.classify.selection import Selection, select_rows
from featx.classify.sweep import FitResult, Sweep
from featx.errors import check_choice
from featx.runtime import human_size
from featx.store.feature_store import FeatureStore
from featx.store.rows import DEFAULT_CHUNK_BYTES, LAYER_JOIN, ConcatRows, open_rows

__all__ = ["fit"]


def fit(
    store: FeatureStore | str | os.PathLike,
    layers: str | Sequence[str],
    classifiers: str | Sequence[str] = "logreg",
    *,
    params: Mapping[str, Any] | Sequence[str] | None = None,
    scale: bool = True,
    pca: int | None = None,
    l2: bool = False,
    pool: str | None = None,
    cv: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    metric: str = "accuracy",
    n_jobs: int = 1,
    stream: bool | None = None,
    memory_budget: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    refit: str | None = None,
    model: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
    log: bool = True,
) -> Sweep:
    """Fit every classifier on every layer of `store`, select hyper-parameters, rank them.

    `params`: `--param` texts (`"C=0.01,0.1"`, `"svm.gamma=scale"`) or a mapping
    {"[clf.]name": value, or [values] for a grid}. `pool`: avg/max/avgmax over the spatial
    maps of a layer stored unpooled (default: flatten). `stream`: True trains out-of-core,
    False never does, None decides by `memory_budget` (bytes; default half the available
    memory). `model` saves the best experiment's model file, `report` the JSON report (and a
    confusion-matrix PNG beside it). `progress` receives one line per finished experiment.

    A layer may be several stored layers joined by `+` (`"blocks.4+bn2"`): each is pooled
    (spatial maps by `pool`, average by default), standardised and concatenated.

    `refit`: after the hyper-parameters are chosen, `"all"` fits the chosen pipeline again on
    the training and validation rows together, `"train"` keeps the one fitted on the training
    rows. Default: `"train"` when the store has a validation split, `"all"` when the
    validation rows were carved out of the training images (a hold-out, or CV folds). Scores
    stay those measured before the refit. Streamed fits are not refit (they stop early on the
    validation rows). `log` appends one record per experiment to the store's run log
    (`featx.runlog`).
    """
    if refit is not None:
        check_choice("refit", refit, REFITS)
    request = FitRequest.checked(
        layers=layers,
        classifiers=classifiers,
        params=params,
        config=PipelineConfig(pool or "none", scale, pca, l2),
        pool=pool,
        cv=cv,
        val_fraction=val_fraction,
        seed=seed,
        metric=metric,
        n_jobs=n_jobs,
        stream=stream,
        budget=default_memory_budget() if memory_budget is None else memory_budget,
        chunk_bytes=chunk_bytes,
        command=command,
    )
    owned = not isinstance(store, FeatureStore)
    store = FeatureStore(store) if owned else store
    try:
        keys = list(dict.fromkeys(resolve_layer(store, layer) for layer in request.layers))
        for key in keys:
            store.check_finite(key, chunk_bytes=request.chunk_bytes)
            if LAYER_JOIN not in key:
                check_pool(store, key, request.config.pool)
        selection = select_rows(store, cv=cv, val_fraction=val_fraction, seed=seed)
        refit = refit or selection.default_refit
        plans = [plan_layer(store, key, selection, request) for key in keys]
        results = _run(store, plans, selection, request, refit, progress or (lambda _text: None))
    finally:
        if owned:
            store.close()
    sweep = Sweep(
        results=_ranked(results),
        metric=metric,
        store=store.path,
        selection=selection.description,
        config={
            "layers": keys,
            "classifiers": request.classifiers,
            "params": {name: grid for name, grid in request.grids.items() if grid},
            "pool": request.config.pool,
            "scale": scale,
            "pca": pca,
            "l2": l2,
            "cv": cv,
            "refit": refit,
            "val_fraction": val_fraction if selection.validation is not None else None,
            "seed": seed,
            "stream": stream,
            "memory_budget": request.budget,
            "chunk_bytes": chunk_bytes,
        },
        command=command,
    )
    if model is not None:
        sweep.best.model.save(model)
    if report is not None:
        sweep.write_report(report)
    if log:
        sweep.record(model)
    return sweep


def _run(
    store: FeatureStore,
    plans: list[tuple[str, bool]],
    selection: Selection,
    request: FitRequest,
    refit: str,
    say: Callable[[str], None],
) -> list[FitResult]:
    """Every classifier on every planned layer, each layer read once (or streamed)."""
    labels = store.labels()
    results = []
    for key, streamed in plans:
        with open_rows(store, key, request.chunk_bytes) as rows:
            if streamed:
                say(
                    f"{key}: training out-of-core in chunks of {rows.chunk_rows} rows "
                    f"({human_size(rows.nbytes(rows.chunk_rows))})"
                )
                X = None
            else:
                X, y = read_rows(rows, selection, labels)
            for name in request.classifiers:
                experiment = Experiment(
                    store=store,
                    key=key,
                    name=name,
                    grid=request.grids[name],
                    config=request.config,
                    selection=selection,
                    seed=request.seed,
                    metric=request.metric,
                    n_jobs=request.n_jobs,
                    refit=refit,
                    row_shapes=rows.row_shapes if isinstance(rows, ConcatRows) else None,
                )
                if streamed:
                    result = experiment.run_streamed(rows, labels)
                else:
                    result = experiment.run_in_memory(X, y)
                result.model.provenance["command"] = request.command
                results.append(result)
                say(
                    f"{key:<24} {name:<10} {request.metric} {format_number(result.score)}  "
                    f"({result.seconds:.1f} s)"
                )
            del X
    return results


def _ranked(results: list[FitResult]) -> list[FitResult]:
    """Best score first (NaN scores last), with their ranks set."""
    ranked = sorted(results, key=lambda r: -r.score if r.score == r.score else np.inf)
    for rank, result in enumerate(ranked, start=1):
        result.rank = rank
    return ranked
