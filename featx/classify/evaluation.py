"""`featx evaluate`: score a model file on a split of any store with matching features, or on
a split of an image folder (its features computed as `featx predict` computes them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from featx.classify.metrics import classification_metrics, metrics_table, plot_confusion_matrix
from featx.errors import UsageError
from featx.extraction.settings import PredictSettings, settled
from featx.models.file import FeatxModel, load_model
from featx.store.feature_store import FeatureStore
from featx.store.rows import DEFAULT_CHUNK_BYTES, ConcatRows, LayerRows, open_rows

__all__ = ["Evaluation", "evaluate", "evaluate_images", "predict_in_chunks"]


def predict_in_chunks(
    pipeline: Pipeline, rows: LayerRows | ConcatRows, index: np.ndarray
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
    store: Path  # the store, or the image folder, that was scored
    split: str
    metrics: dict[str, Any]
    paths: np.ndarray  # image paths relative to the dataset root
    y_true: np.ndarray  # indices into model.class_names
    y_pred: np.ndarray
    proba: np.ndarray | None  # columns follow model.pipeline.classes_; None without them
    command: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why), not scored

    @property
    def predicted_names(self) -> list[str]:
        return [self.model.class_names[i] for i in self.y_pred]

    def table(self) -> str:
        return metrics_table(self.metrics, f"{self.split} split of {self.store}")

    def record(self) -> int:
        """Append this evaluation to the store's run log (`featx.runlog`): settings (layer,
        classifier, params, model), scores {split: metrics}. Returns the run id."""
        from featx.runlog import record_run

        p = self.model.provenance
        return record_run(
            self.store,
            "evaluate",
            settings={
                "layer": self.model.layer["key"],
                "classifier": p.get("classifier"),
                "params": p.get("params") or {},
                "pipeline": p.get("pipeline"),
                "trained_on": p.get("trained_on"),
            },
            scores={self.split: self.metrics},
            model_path=str(self.model.path) if self.model.path else None,
            command=self.command,
        )

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
    log: bool = True,
    command: str | None = None,
) -> Evaluation:
    """Score `model` on the original (non-augmented) images of `split` of `store`.

    The store must hold the model's layer(s) computed by the same backbone, weights and
    preprocessing (UsageError saying what differs otherwise); its classes must be among the
    model's. Rows are read in chunks, so any store size works. `log` appends the result to the
    store's run log.
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
        with open_rows(store, key, chunk_bytes) as rows:
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
            command,
        )
    finally:
        if owned:
            store.close()
    if report is not None:
        result.write_report(report)
    if log:
        result.record()
    return result


def evaluate_images(
    model: FeatxModel | str | os.PathLike,
    data: str | os.PathLike,
    split: str = "test",
    settings: PredictSettings | None = None,
    *,
    report: str | os.PathLike | None = None,
    command: str | None = None,
    **overrides: Any,
) -> Evaluation:
    """Score `model` on the images of `split` of `data` (an image folder, DATA/SPLIT/CLASS/ or,
    as split "unsplit", DATA/CLASS/, or a manifest), computing the features the model reads as
    `featx predict` does (`settings`: a `PredictSettings`, with `overrides`; its tta and top_k
    do not apply). Image files that cannot be decoded are left out and listed in `skipped`."""
    from featx.classify.prediction import features_for_images
    from featx.inference.images import open_images

    s = settled(settings or PredictSettings(), overrides)
    if s.tta:
        raise UsageError("--tta applies to predict; evaluate scores each image once.")
    if not isinstance(model, FeatxModel):
        model = load_model(model)
    folder = open_images(data)
    entries = [f for f in folder.files if f.split == split]
    if not entries:
        have = sorted({f.split for f in folder.files})
        raise UsageError(f"{data} has no {split!r} images; it has: {', '.join(have)}.")
    unknown = sorted({folder.class_names[f.label] for f in entries} - set(model.class_names))
    if unknown:
        raise UsageError(
            f"{data} has classes the model was not trained on: {', '.join(unknown[:5])}."
        )
    files = [folder.root / f.path for f in entries]
    to_model = np.array([model.class_names.index(c) for c in folder.class_names])
    y_true = to_model[[f.label for f in entries]]
    y_pred = np.empty(len(files), dtype=np.int64)
    proba = np.empty((len(files), len(model.pipeline.classes_))) if model.has_proba else None
    skipped: list[tuple[str, str]] = []
    scored = np.ones(len(files), dtype=bool)
    for index, X, bad in features_for_images(model, files, s, desc="evaluate"):
        skipped.extend((str(files[i]), reason) for i, reason in bad)
        scored[[i for i, _ in bad]] = False
        if X is not None:
            y_pred[index] = model.pipeline.predict(X)
            if proba is not None:
                proba[index] = model.pipeline.predict_proba(X)
    scored = np.flatnonzero(scored)
    if len(scored) == 0:
        raise UsageError(f"none of the {split!r} images of {data} could be decoded.")
    y_true, y_pred = y_true[scored], y_pred[scored]
    proba = proba[scored] if proba is not None else None
    metrics = classification_metrics(
        y_true, y_pred, model.class_names, proba, model.pipeline.classes_
    )
    result = Evaluation(
        model,
        Path(data),
        split,
        metrics,
        np.array([entries[i].path for i in scored]),
        y_true,
        y_pred,
        proba,
        command,
        skipped,
    )
    if report is not None:
        result.write_report(report)
    return result
