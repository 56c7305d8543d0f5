"""`featx probe`: how well each stored layer transfers, judged by the field's fixed protocols
(see `featx.classify.probe_protocols`) on every layer at once.

Rows: the store's training split fits; the validation split chooses C (or k), or, when the
store has none, a stratified hold-out of 20% of the training images drawn by source image
(`featx.classify.selection`); the test split, when there is one, scores the model refit on
training + validation rows. Only original images (view 0) are validated and tested.

Each layer is read once and kept on the device (float64 when it is small, float32 otherwise);
the linear probe standardises features with the statistics of the rows it is fitted on (the
training rows for the path, training + validation rows for the refit), folded into the
weights. A layer whose rows need more than the memory budget is streamed from the store in
row chunks through the loss and gradient instead; the table says the memory the features
took.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from featx.classify.plan import default_memory_budget
from featx.classify.probe_data import LayerSource
from featx.classify.probe_protocols import C_GRID, run_protocol
from featx.classify.probe_result import LayerProbe, ProbeResult
from featx.classify.probe_settings import ClassWeight, ProbeSettings, Protocol, SpatialPool
from featx.classify.selection import Selection, select_rows
from featx.errors import UsageError
from featx.settings import Device, check_settings
from featx.store.feature_store import FeatureStore
from featx.store.rows import DEFAULT_CHUNK_BYTES

__all__ = ["few_shot_rows", "probe"]

UNBALANCED = 1.25  # largest / smallest training class above which mean per-class accuracy ranks


def probe(
    store: FeatureStore | str | os.PathLike,
    settings: ProbeSettings | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> ProbeResult:
    """Probe every stored layer (or `layers`) with one protocol; see the module docstring.

    >>> result = probe("stores/fashion.h5", protocol="linear", shots=[1, 5], tries=3)
    >>> print(result.table())

    `overrides` replace fields of `settings` (`ProbeSettings`). `progress` receives one line
    per finished layer. Writes `report` and `save_best` when given; records one run per
    layer in the store's run log unless `log=False`.
    """
    import torch

    from featx.runtime import check_output_file, resolve_device

    settings = dataclasses.replace(settings or ProbeSettings(), **overrides)
    check_settings(settings)
    protocol = Protocol(settings.protocol).value
    if settings.save_best is not None and protocol == "ncm":
        raise UsageError("--save-best writes a linear or knn probe, not ncm.")
    check_output_file("report", settings.report)
    check_output_file("save-best", settings.save_best)
    say = progress or (lambda _text: None)
    device = resolve_device(Device(settings.device).value)
    owned = not isinstance(store, FeatureStore)
    store = FeatureStore(store) if owned else store
    try:
        keys = _layers(store, settings.layers)
        selection = select_rows(store, val_fraction=settings.val_fraction, seed=settings.seed)
        index, labels = _parts(store, selection)
        metric = _metric(store, labels[index["train"]])
        layers = []
        for depth, key in enumerate(keys):
            with torch.no_grad():
                layers.append(_probe_layer(store, key, depth, index, labels, settings, device))
            r = layers[-1]
            say(f"{key}: {metric} {r.score(metric):.4f} on validation ({r.seconds:.1f} s)")
    finally:
        if owned:
            store.close()
    result = ProbeResult(
        layers=layers,
        protocol=protocol,
        metric=metric,
        store=store.path,
        selection=selection.description,
        class_names=list(store.class_names),
        settings=dataclasses.asdict(settings),
        device=str(device),
        command=settings.command,
    )
    if settings.save_best is not None:
        _save_best(result, settings)
    if settings.report is not None:
        result.write_report(settings.report)
    if settings.log:
        result.record(settings.save_best)
    return result


def _layers(store: FeatureStore, asked: list[str]) -> list[str]:
    """Store keys in network order: the order extraction was asked for them (the store's
    history), then by name with numbers compared as numbers."""
    keys = list(dict.fromkeys(store.resolve(k) for k in asked)) if asked else store.layers
    if not keys:
        raise UsageError(f"store {store.path} has no layers to probe.")
    for key in keys:
        store.check_finite(key)
    history = [k for run in store.meta.get("history", []) for k in run.get("layers", [])]
    first = {k: i for i, k in reversed(list(enumerate(history)))}
    natural = lambda k: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k)]  # noqa: E731
    return sorted(keys, key=lambda k: (first.get(k, len(history)), natural(k)))


def _parts(store: FeatureStore, selection: Selection) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{train, validation[, test]} sorted store rows, and every row's label."""
    labels = store.labels()
    index = {"train": selection.train, "validation": selection.validation}
    if "test" in store.splits:
        split_of, views = store.split_of_rows(), store.views()
        index["test"] = np.flatnonzero((split_of == "test") & (views == 0))
    missing = sorted(set(range(len(store.class_names))) - set(labels[selection.train]))
    if missing:
        names = ", ".join(store.class_names[i] for i in missing)
        raise UsageError(f"store {store.path} has no training images of class {names}.")
    return index, labels


def _metric(store: FeatureStore, train_labels: np.ndarray) -> str:
    counts = np.bincount(train_labels, minlength=len(store.class_names))
    return "balanced_accuracy" if counts.max() > UNBALANCED * counts.min() else "accuracy"


def few_shot_rows(
    sources: np.ndarray, labels: np.ndarray, shots: int, seed: int, attempt: int
) -> np.ndarray:
    """Sorted positions of the rows of `shots` source images per class (every view of each
    image), drawn with a generator seeded by (seed, shots, attempt)."""
    rng = np.random.default_rng([seed, shots, attempt])
    chosen = []
    for c in np.unique(labels):
        images = np.unique(sources[labels == c])
        if len(images) < shots:
            raise UsageError(
                f"--shots {shots} needs {shots} training images of every class; one class has "
                f"{len(images)}."
            )
        chosen.append(rng.choice(images, size=shots, replace=False))
    return np.flatnonzero(np.isin(sources, np.concatenate(chosen)))


def _probe_layer(store, key, depth, index, labels, settings, device) -> LayerProbe:
    budget = settings.memory_budget or default_memory_budget()
    source = LayerSource.open(
        store, key, index, labels, pool=SpatialPool(settings.pool).value, device=device,
        budget=budget, chunk_bytes=settings.chunk_bytes or DEFAULT_CHUNK_BYTES,
        stream=settings.stream,
    )  # fmt: skip
    metric = _metric(store, labels[index["train"]])
    common = {
        "n_classes": len(store.class_names),
        "metric": metric,
        "class_weight": ClassWeight(settings.class_weight).value,
        "Cs": C_GRID,
        "max_iter": settings.max_iter,
        "tol": settings.tol,
    }
    protocol = Protocol(settings.protocol).value
    try:
        full = run_protocol(source, protocol, **common)
        few_shot = {}
        train = index["train"]
        sources, train_labels = store.sources()[train], labels[train]
        for shots in settings.shots:
            runs = [
                run_protocol(
                    source,
                    protocol,
                    subset=few_shot_rows(sources, train_labels, shots, settings.seed, attempt),
                    **common,
                )  # fmt: skip
                for attempt in range(settings.tries)
            ]
            few_shot[str(shots)] = _few_shot_summary(runs)
    finally:
        source.close()
    return LayerProbe(
        layer=source.key,
        depth=depth,
        n_features=source.n_features,
        chosen=full["chosen"],
        path=full["path"],
        validation=full["validation"],
        test=full["test"],
        temperature=full["temperature"],
        refit=full["refit"],
        seconds=full["seconds"] + sum(r["seconds"] for r in few_shot.values()),
        streamed=source.streamed,
        memory_bytes=source.memory_bytes,
        dtype=str(source.dtype).removeprefix("torch."),
        few_shot=few_shot,
    )


def _few_shot_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over the tries of the test scores (validation without a test split)."""
    split = "test" if runs[0]["test"] is not None else "validation"
    out: dict[str, Any] = {"scored_on": split, "tries": len(runs)}
    for name in ("accuracy", "balanced_accuracy"):
        values = [r[split][name] for r in runs]
        out[name] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                     "values": values}  # fmt: skip
    out["chosen"] = [r["chosen"] for r in runs]
    out["seconds"] = sum(r["seconds"] for r in runs)
    return out


def _save_best(result: ProbeResult, settings: ProbeSettings) -> None:
    """The best layer's probe as an ordinary model file, fitted by `featx fit` on training +
    validation rows: logistic regression at the chosen C on standardised features, or knn
    (uniform votes) with the chosen k on L2-normalised features."""
    from featx.classify.fitting import fit

    best = result.best
    if result.protocol == "linear":
        params: dict[str, Any] = {"C": best.chosen["C"], "max_iter": settings.max_iter}
        if ClassWeight(settings.class_weight).value == "balanced":
            params["class_weight"] = "balanced"
        classifier, scale, l2 = "logreg", True, False
    else:
        params, classifier, scale, l2 = {"n_neighbors": best.chosen["k"]}, "knn", False, True
    with FeatureStore(result.store) as store:
        spatial = len(store.layer(best.layer).shape) == 3
        fit(
            store, best.layer, classifier, params=params, scale=scale, l2=l2,
            pool=SpatialPool(settings.pool).value if spatial else None,
            val_fraction=settings.val_fraction, seed=settings.seed, refit="all",
            model=settings.save_best, command=settings.command, log=False,
        )  # fmt: skip
