"""`featx fit`: classifiers trained on stored layers, every layer x classifier combination,
ranked by a validation score. The rows are chosen by `featx.classify.selection`, the request
checked and each layer planned (in memory or out-of-core) by `featx.classify.plan`, each
experiment run by `featx.classify.experiment`, and the results gathered in a
`featx.classify.sweep.Sweep`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from featx.classify.experiment import Experiment, read_rows
from featx.classify.fit_settings import FitSettings
from featx.classify.metrics import format_number
from featx.classify.plan import FitRequest, check_pool, plan_layer, resolve_layer
from featx.classify.selection import Selection, select_rows
from featx.classify.sweep import FitResult, Sweep
from featx.runtime import human_size
from featx.store.feature_store import FeatureStore
from featx.store.rows import LAYER_JOIN, ConcatRows, open_rows

__all__ = ["fit"]


def fit(
    store: FeatureStore | str | os.PathLike,
    layers: str | Sequence[str] | None = None,
    classifiers: str | Sequence[str] | None = None,
    *,
    settings: FitSettings | None = None,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
    log: bool = True,
    **overrides: Any,
) -> Sweep:
    """Fit every classifier on every layer of `store`, select hyper-parameters, rank them.

    `settings` (`FitSettings`) says what to fit and how; keyword `overrides` replace its
    fields (`fit(store, "layer4", "svm", params=["C=0.1,1"], cv=5)`; `layers` and
    `classifiers` may also come first, by position). `model` saves the best experiment's
    model file, `report` the JSON report (and a confusion-matrix PNG beside it). `progress`
    receives one line per finished experiment; `log` appends one record per experiment to the
    store's run log (`featx.runlog`).

    A layer may be several stored layers joined by `+` (`"blocks.4+bn2"`): each is pooled
    (spatial maps by `pool`, average by default), standardised and concatenated.

    `refit`: after the hyper-parameters are chosen, `"all"` fits the chosen pipeline again on
    the training and validation rows together, `"train"` keeps the one fitted on the training
    rows. Default: `"train"` when the store has a validation split, `"all"` when the
    validation rows were carved out of the training images (a hold-out, or CV folds). Scores
    stay those measured before the refit. Streamed fits are not refit (they stop early on the
    validation rows).
    """
    given = {"layers": layers, "classifiers": classifiers}
    overrides |= {k: v for k, v in given.items() if v is not None}
    if "chunk_bytes" in overrides:  # the keyword of earlier releases
        overrides["chunk_mb"] = overrides.pop("chunk_bytes") / 1e6
    settings = dataclasses.replace(settings or FitSettings(), **overrides)
    request = FitRequest.checked(settings)
    s = settings
    owned = not isinstance(store, FeatureStore)
    store = FeatureStore(store) if owned else store
    try:
        keys = list(dict.fromkeys(resolve_layer(store, layer) for layer in s.layers))
        for key in keys:
            store.check_finite(key, chunk_bytes=s.chunk_bytes)
            if LAYER_JOIN not in key:
                check_pool(store, key, request.config.pool)
        selection = select_rows(store, cv=s.cv, val_fraction=s.val_fraction, seed=s.seed)
        refit = s.refit or selection.default_refit
        plans = [plan_layer(store, key, selection, request) for key in keys]
        say = progress or (lambda _text: None)
        results = _run(store, plans, selection, request, refit, say, command)
    finally:
        if owned:
            store.close()
    resolved = {
        "layers": keys,
        "params": {name: grid for name, grid in request.grids.items() if grid},
        "pool": request.config.pool,
        "refit": refit,
        "val_fraction": s.val_fraction if selection.validation is not None else None,
        "memory_budget": request.budget,
        "chunk_bytes": s.chunk_bytes,
    }
    sweep = Sweep(
        results=_ranked(results),
        metric=s.metric,
        store=store.path,
        selection=selection.description,
        config=dataclasses.asdict(s) | resolved,
        command=command,
    )
    if s.model is not None:
        sweep.best.model.save(s.model)
    if s.report is not None:
        sweep.write_report(s.report)
    if log:
        sweep.record(s.model)
    return sweep


def _run(
    store: FeatureStore,
    plans: list[tuple[str, bool]],
    selection: Selection,
    request: FitRequest,
    refit: str,
    say: Callable[[str], None],
    command: str | None,
) -> list[FitResult]:
    """Every classifier on every planned layer, each layer read once (or streamed)."""
    s = request.settings
    labels = store.labels()
    results = []
    for key, streamed in plans:
        with open_rows(store, key, s.chunk_bytes) as rows:
            if streamed:
                say(
                    f"{key}: training out-of-core in chunks of {rows.chunk_rows} rows "
                    f"({human_size(rows.nbytes(rows.chunk_rows))})"
                )
                X = None
            else:
                X, y = read_rows(rows, selection, labels)
            for name in s.classifiers:
                experiment = Experiment(
                    store=store,
                    key=key,
                    name=name,
                    grid=request.grids[name],
                    config=request.config,
                    selection=selection,
                    seed=s.seed,
                    metric=s.metric,
                    n_jobs=s.n_jobs,
                    refit=refit,
                    row_shapes=rows.row_shapes if isinstance(rows, ConcatRows) else None,
                )
                if streamed:
                    result = experiment.run_streamed(rows, labels)
                else:
                    result = experiment.run_in_memory(X, y)
                result.model.provenance["command"] = command
                results.append(result)
                say(
                    f"{key:<24} {name:<10} {s.metric} {format_number(result.score)}  "
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
