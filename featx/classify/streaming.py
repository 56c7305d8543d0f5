"""Out-of-core training: a pipeline learned from row chunks of a store layer, with early
stopping on the validation rows (StandardScaler and IncrementalPCA by `partial_fit`, then
`sgd` or `mlp` passes over block-shuffled chunks)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline

from featx.classify.evaluation import predict_in_chunks
from featx.classify.metrics import classification_metrics
from featx.classify.selection import Selection
from featx.store.rows import LayerRows

__all__ = ["fit_streamed"]


def fit_streamed(
    pipeline: Pipeline,
    rows: LayerRows,
    labels: np.ndarray,
    selection: Selection,
    class_names: list[str],
    seed: int,
) -> tuple[Pipeline, dict[str, Any], list[float]]:
    """Fit `pipeline` (unfitted, with a streaming classifier) on the training rows of
    `selection` chunk by chunk; returns it with its validation metrics and the stopping
    criterion after each pass."""
    train, validation = selection.train, selection.validation
    steps = dict(pipeline.steps)
    first = rows.dataset[int(train[0]) : int(train[0]) + 1]
    steps["features"].fit(first)
    prepare = pipeline[:1]
    if "scale" in steps:
        for _, X in rows.iter(train):
            steps["scale"].partial_fit(prepare.transform(X))
        prepare = pipeline[:2]
    if "pca" in steps:
        for X in _at_least(rows.iter(train), steps["pca"].n_components):
            steps["pca"].partial_fit(prepare.transform(X))
        prepare = pipeline[: len(prepare) + 1]
    if "l2" in steps:
        steps["l2"].fit(prepare.transform(first))
        prepare = pipeline[: len(prepare) + 1]

    clf = steps["clf"]
    classes = np.unique(labels[train])
    schedule = _schedule(clf)
    rng = np.random.RandomState(seed)
    best_value, best_clf, best_epoch, history = np.inf, None, 0, []
    y_val = labels[validation]
    for epoch in range(1, schedule.max_epochs + 1):
        for positions, X in rows.iter(train, rng=rng):
            clf.partial_fit(prepare.transform(X), labels[train[positions]], classes=classes)
        pipeline.steps[-1] = ("clf", clf)
        y_pred, proba = predict_in_chunks(pipeline, rows, validation)
        if schedule.criterion == "loss" and proba is not None:
            full = np.zeros((len(y_val), len(class_names)))
            full[:, clf.classes_] = proba
            value = float(log_loss(y_val, full, labels=np.arange(full.shape[1])))
        else:
            value = float(np.mean(y_pred != y_val))
        history.append(value)
        if best_clf is None or value < best_value - schedule.tol:
            best_value, best_clf, best_epoch = value, copy.deepcopy(clf), epoch
            best_pred = (y_pred, proba)
        elif schedule.patience is not None and epoch - best_epoch >= schedule.patience:
            break
    if schedule.patience is None:  # no early stopping: keep the last pass
        best_clf, best_pred = clf, (y_pred, proba)
    pipeline.steps[-1] = ("clf", best_clf)
    metrics = {
        "validation": classification_metrics(
            y_val, best_pred[0], class_names, best_pred[1], best_clf.classes_
        )
    }
    return pipeline, metrics, history


@dataclass(frozen=True)
class _Schedule:
    """How many passes a streamed fit takes over the training rows, and when it stops."""

    max_epochs: int
    patience: int | None  # passes without improvement before stopping; None: keep the last
    criterion: str  # "loss": validation log loss; "error": validation error rate
    tol: float  # a smaller improvement does not count


def _schedule(clf: BaseEstimator) -> _Schedule:
    """The MLP's own rule: at most `epochs` passes, stop after `patience` passes without a
    lower validation loss (if `early_stopping`). SGD follows scikit-learn's early stopping: at
    most `max_iter` passes, stop after `n_iter_no_change` passes in which the validation
    accuracy did not improve by `tol` (SGD's probabilities are too poorly calibrated for its
    log loss to be a good stopping signal)."""
    params = clf.get_params()
    if "epochs" in params:
        patience = params["patience"] if params["early_stopping"] else None
        return _Schedule(params["epochs"], patience, "loss", 0.0)
    return _Schedule(params["max_iter"], params["n_iter_no_change"], "error", params["tol"] or 0.0)


def _at_least(chunks, n: int):
    """Row chunks of at least `n` rows (IncrementalPCA needs as many rows as components): a
    short last chunk is merged into the one before it."""
    held = None
    for _, X in chunks:
        if held is not None and len(X) < n:
            yield np.concatenate([held, X])
            held = None
            continue
        if held is not None:
            yield held
        held = X
    if held is not None:
        yield held
