"""`featx evaluate`: score a model file on a split of any store with matching features."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from featx.classify.metrics import classification_metrics, metrics_table, plot_confusion_matrix
from featx.errors import UsageError
from featx.models.file import FeatxModel, load_model
from featx.store.feature_store import FeatureStore
from featx.store.rows import DEFAULT_CHUNK_BYTES, LayerRows

__all__ = ["Evaluation", "evaluate", "predict_in_chunks"]


def predict_in_chunks(
    pipeline: Pipeline, rows: LayerRows, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted labels and (when the classifier has them) probabilities for rows `index`,
    computed chunk by chunk; probability columns follow `pipeline.classes_`."""
    y_pred = np.empty(len(index), dtype=np.int64)
    has_proba = hasattr(pipeline, "predict_proba")
    proba = np.empty((len(index), len(pipeline.classes_))) if has_proba else None
    for positions, X in rows.iter(index):
        y_pred[positions] = pipeline.predict(X)
        if has_proba:
            proba[positions] = pipeline.predict_proba(X)
    return y_pred, proba


@dataclass
class Evaluation:
    """Metrics of a model on one split of a store, with the per-image predictions."""

    model: FeatxModel
    store: Path
    split: str
    metrics: dict[str, Any]
    paths: np.ndarray  # image paths relative to the dataset root
    y_true: np.ndarray  # indices into model.class_names
    y_pred: np.ndarray
    proba: np.ndarray | None  # columns follow model.pipeline.classes_; None without them

    @property
    def predicted_names(self) -> list[str]:
        return [self.model.class_names[i] for i in self.y_pred]

    def table(self) -> str:
        return metrics_table(self.metrics, f"{self.split} split of {self.store}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model.path) if self.model.path else None,
            "store": str(self.store),
            "split": self.split,
            "layer": self.model.layer["key"],
            "classifier": self.model.provenance["classifier"],
            "metrics": self.metrics,
        }

    def write_report(self, path: str | os.PathLike) -> list[Path]:
        """The JSON report at `path` and the confusion matrix next to it as PNG."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        png = plot_confusion_matrix(
            self.metrics,
            path.with_name(f"{path.stem}-confusion.png"),
            f"{self.model.provenance['classifier']} on {self.model.layer['key']}: {self.split}",
        )
        return [path, png]


def evaluate(
    model: FeatxModel | str | os.PathLike,
    store: FeatureStore | str | os.PathLike,
    split: str = "test",
    *,
    report: str | os.PathLike | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Evaluation:
    """Score `model` on the original (non-augmented) images of `split` of `store`.

    The store must hold the model's layer computed by the same backbone, weights and
    preprocessing (UsageError saying what differs otherwise); its classes must be among the
    model's. Rows are read in chunks, so any store size works.
    """
    if not isinstance(model, FeatxModel):
        model = load_model(model)
    owned = not isinstance(store, FeatureStore)
    store = FeatureStore(store) if owned else store
    try:
        key = model.store_layer(store)
        store.check_finite(key, split)
        index = store.rows(split)
        index = np.arange(store.n_rows)[index]
        index = index[store.views(split) == 0]
        if len(index) == 0:
            raise UsageError(f"the {split!r} split of store {store.path} has no original images.")
        to_model = np.array([model.class_names.index(c) for c in store.class_names])
        y_true = to_model[store.labels(split)[store.views(split) == 0]]
        with LayerRows(store, key, chunk_bytes) as rows:
            y_pred, proba = predict_in_chunks(model.pipeline, rows, index)
        metrics = classification_metrics(
            y_true, y_pred, model.class_names, proba, model.pipeline.classes_
        )
        result = Evaluation(
            model,
            store.path,
            split,
            metrics,
            store.paths(split)[store.views(split) == 0],
            y_true,
            y_pred,
            proba,
        )
    finally:
        if owned:
            store.close()
    if report is not None:
        result.write_report(report)
    return result
