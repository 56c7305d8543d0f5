"""The model file: a fitted pipeline and where its features come from.

A model file is a joblib pickle (the scikit-learn convention) of a plain dict:

    {"format": "featx-model", "format_version": 1,
     "pipeline": <fitted sklearn Pipeline, input: rows of the layer as stored>,
     "provenance": {backbone, weights, weights_spec, weights_sha256, preprocessing,
                    layer{key, name, module, pool, dtype, row_shape, precision},
                    class_names, store{path, fingerprint, ...}, classifier, params,
                    pipeline config, selection, metrics, versions, created, command}}

Loading a pickle runs code stored in it: only load model files you trust. featx loads a model
only when a command is given its path (`evaluate`, `predict`, `info`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from featx.backbones.registry import Preprocessing
from featx.errors import UsageError
from featx.runtime import atomic_write, human_size, library_versions, now, to_json
from featx.store.feature_store import FeatureStore

MODEL_FORMAT = "featx-model"
MODEL_FORMAT_VERSION = 1


def layer_record(
    *, key: str, name: str, module: str, pool: str, precision: str, dtype: str, row_shape
) -> dict[str, Any]:
    """What identifies a feature layer: names, module path, pooling, precision, dtype, shape."""
    return {
        "key": key,
        "name": name,
        "module": module,
        "pool": pool,
        "precision": precision,
        "dtype": dtype,
        "row_shape": list(row_shape),
    }


LAYER_JOIN = "+"


def combined_layer_record(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """The `layer` entry of a model on several joined layers: each field `+`-joined (the row
    shape is the length of the concatenated rows); the records themselves are kept in the
    provenance's `layers`."""
    return {
        "key": LAYER_JOIN.join(layer["key"] for layer in layers),
        "name": LAYER_JOIN.join(layer["name"] for layer in layers),
        "module": LAYER_JOIN.join(layer["module"] for layer in layers),
        "pool": LAYER_JOIN.join(layer["pool"] for layer in layers),
        "precision": LAYER_JOIN.join(dict.fromkeys(layer["precision"] for layer in layers)),
        "dtype": str(np.result_type(*(layer["dtype"] for layer in layers))),
        "row_shape": [sum(int(np.prod(layer["row_shape"])) for layer in layers)],
    }


def layer_provenance(store: FeatureStore, key: str) -> dict[str, Any]:
    """The `layer_record` of layer `key` of `store`."""
    info = store.layer(key)
    return layer_record(
        key=info.key,
        name=info.attrs.get("layer", info.key),
        module=info.attrs.get("module", info.key),
        pool=info.attrs.get("pool", "none"),
        precision=info.attrs.get("precision", "fp32"),
        dtype=info.dtype,
        row_shape=info.shape,
    )


def feature_identity(
    *,
    backbone: str,
    weights: str,
    weights_spec: str | None,
    weights_sha256: str,
    preprocessing: Preprocessing,
) -> dict[str, Any]:
    """The backbone, weights and preprocessing that make a model's features."""
    return {
        "backbone": backbone,
        "weights": weights,
        "weights_spec": weights_spec,
        "weights_sha256": weights_sha256,
        "preprocessing": preprocessing.to_dict(),
        "preprocessing_text": preprocessing.describe(),
    }


def store_provenance(store: FeatureStore) -> dict[str, Any]:
    """The feature identity shared by every layer of a store, and which store it was."""
    m = store.meta
    return {
        **feature_identity(
            backbone=m["backbone"],
            weights=m["weights"],
            weights_spec=m.get("weights_spec"),
            weights_sha256=m["weights_sha256"],
            preprocessing=Preprocessing.from_dict(m["preprocessing"]),
        ),
        "store": {
            "path": str(store.path.resolve()),
            "dataset_root": m["dataset"]["root"],
            "dataset_fingerprint": m["dataset"]["fingerprint"],
            "n_rows": store.n_rows,
            "augment": m.get("augment"),
            "created": m.get("created"),
            "versions": m.get("versions", {}),
        },
    }


def model_provenance(
    features: dict[str, Any], layer: dict[str, Any], class_names: list[str], **training: Any
) -> dict[str, Any]:
    """The provenance of a model file: `features` (`store_provenance` or `feature_identity`
    with a "store" entry), the `layer_record`, the class names and what training recorded
    (classifier, params, estimator, pipeline, selection, n_train, metrics, command...), with
    the library versions and time, as plain JSON types."""
    provenance = {
        **features,
        "layer": layer,
        "class_names": list(class_names),
        **training,
        "versions": library_versions(),
        "created": now(),
    }
    return json.loads(json.dumps(provenance, default=to_json))


@dataclass
class FeatxModel:
    """A fitted pipeline with its provenance. Build with `featx.fit`; load with `load_model`."""

    pipeline: Pipeline
    provenance: dict[str, Any]
    path: Path | None = field(default=None, compare=False)

    # ---- what it is ---------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.provenance["class_names"])

    @property
    def layer(self) -> dict[str, Any]:
        return self.provenance["layer"]

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The `layer_record` of every layer the model reads, in the order of its columns."""
        return list(self.provenance.get("layers") or [self.layer])

    @property
    def has_proba(self) -> bool:
        return hasattr(self.pipeline, "predict_proba")

    # ---- using it -----------------------------------------------------------------------
    def scores(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted label indices, scores of shape (n, n_classes)) for stored-layer rows:
        probabilities when the classifier has them, decision values otherwise. Columns follow
        `class_names`; a class absent from training scores 0 (or -inf as a decision value)."""
        labels = self.pipeline.classes_.astype(int)
        predicted = self.pipeline.predict(X).astype(int)
        if self.has_proba:
            part = self.pipeline.predict_proba(X)
            fill = 0.0
        else:
            part = self.pipeline.decision_function(X)
            if part.ndim == 1:
                part = np.column_stack([-part, part])
            fill = -np.inf
        scores = np.full((len(X), len(self.class_names)), fill)
        scores[:, labels] = part
        return predicted, scores

    # ---- the file -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file (atomically: a partial file never replaces a good one)."""
        import joblib

        path = Path(path)
        payload = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "pipeline": self.pipeline,
            "provenance": self.provenance,
        }
        atomic_write(path, lambda fh: joblib.dump(payload, fh))
        self.path = path
        return path

    def differences(self, store: FeatureStore) -> list[str]:
        """How `store`'s features differ from those the model was trained on (empty if none)."""
        p, m = self.provenance, store.meta
        out = []
        if m["backbone"] != p["backbone"]:
            out.append(
                f"the backbone is {p['backbone']} in the model, {m['backbone']} in the store"
            )
        if m["weights_sha256"] != p["weights_sha256"]:
            out.append(
                f"the weights are {p['weights']} (sha256 {p['weights_sha256'][:16]}) in the model, "
                f"{m['weights']} (sha256 {m['weights_sha256'][:16]}) in the store"
            )
        old, new = (Preprocessing.from_dict(d) for d in (p["preprocessing"], m["preprocessing"]))
        if old != new:
            old, new = old.describe(), new.describe()
            out.append(f"the preprocessing is '{old}' in the model, '{new}' in the store")
        for layer in self.layers:
            key = _find_layer(store, layer)
            if key is None:
                out.append(
                    f"the store has no layer {layer['key']} (module {layer['module']}, pool "
                    f"{layer['pool']}); it has: {', '.join(store.layers) or 'none'}"
                )
                continue
            info = store.layer(key)
            if list(info.shape) != list(layer["row_shape"]):
                out.append(
                    f"layer {key} has rows of shape {'x'.join(map(str, info.shape))} in the store, "
                    f"{'x'.join(map(str, layer['row_shape']))} in the model"
                )
        unknown = [c for c in store.class_names if c not in self.class_names]
        if unknown:
            out.append(
                f"the store has classes the model was not trained on: {', '.join(unknown[:5])}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            )
        return out

    def store_layer(self, store: FeatureStore) -> str:
        """The key of the model's layer in `store` (`+`-joined keys for several layers);
        UsageError saying what differs."""
        differences = self.differences(store)
        if differences:
            model = f"model {self.path}" if self.path else "the model"
            raise UsageError(
                f"store {store.path} does not match {model}: {'; '.join(differences)}."
            )
        return LAYER_JOIN.join(_find_layer(store, layer) for layer in self.layers)

    # ---- description --------------------------------------------------------------------
    def summary(self) -> str:
        """What `featx info MODEL` prints."""
        p = self.provenance
        store = p["store"]
        size = f"  ({human_size(self.path.stat().st_size)})" if self.path else ""
        params = ", ".join(f"{k}={v!r}" for k, v in p["params"].items()) or "defaults"
        lines = [
            f"model       {self.path or '(not saved)'}{size}",
            f"classifier  {p['classifier']} ({params})",
            f"estimator   {p['estimator']}",
            f"pipeline    {p['pipeline']}",
            *(
                f"layer       {layer['key']}  (module {layer['module']}, "
                f"{'x'.join(map(str, layer['row_shape']))} {layer['dtype']}, "
                f"pooled at extraction: {layer['pool']})"
                for layer in self.layers
            ),
            f"backbone    {p['backbone']}",
            f"weights     {p['weights']}  sha256 {p['weights_sha256'][:16]}  "
            f"(load as --weights {p.get('weights_spec')})",
            f"preprocess  {p['preprocessing_text']}",
            f"classes     {len(p['class_names'])}: {', '.join(p['class_names'][:20])}"
            + (" ..." if len(p["class_names"]) > 20 else ""),
            f"store       {store['path']}",
            f"dataset     {store['dataset_root']}  "
            f"(fingerprint {store['dataset_fingerprint'][:16]})",
            f"selection   {p['selection']}",
            f"trained on  {_trained_on(p)}",
        ]
        for split, metrics in (p.get("metrics") or {}).items():
            lines.append(f"metrics     {_metrics_line(split, metrics)}")
        versions = p.get("versions", {})
        lines.append(
            f"created     {p['created']}  featx {versions.get('featx')}, scikit-learn "
            f"{versions.get('scikit-learn')}, torch {versions.get('torch')}"
        )
        if p.get("command"):
            lines.append(f"command     {p['command']}")
        return "\n".join(lines)


def _trained_on(p: dict[str, Any]) -> str:
    """Which rows the final model saw; files written before refit record only a count."""
    streamed = " (streamed from the store)" if p.get("streamed") else ""
    seen = p.get("trained_on")
    if not seen:
        return f"{p['n_train']} rows{streamed}"
    note = "; the metrics below were measured before this refit" if seen["refit"] == "all" else ""
    return (
        f"{seen['n_rows']} rows of {' + '.join(seen['splits'])}  "
        f"(--refit {seen['refit']}{note}){streamed}"
    )


def _metrics_line(split: str, metrics: Any) -> str:
    """One line of numbers for a split's metrics (or a CV summary)."""
    if not isinstance(metrics, dict):
        return f"{split}: {metrics}"
    if split == "cv":
        parts = [
            f"{name} {metrics[name]['mean']:.4f} ± {metrics[name]['std']:.4f}"
            for name in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss")
            if isinstance(metrics.get(name), dict)
        ]
        return f"{metrics.get('folds')}-fold CV: " + ", ".join(parts)
    parts = [
        f"{label} {metrics[name]:.4f}"
        for name, label in (
            ("accuracy", "accuracy"),
            ("balanced_accuracy", "balanced accuracy"),
            ("macro_f1", "macro F1"),
            ("log_loss", "log loss"),
        )
        if isinstance(metrics.get(name), int | float)
    ]
    return f"{split}: " + ", ".join(parts)


def _find_layer(store: FeatureStore, layer: dict[str, Any]) -> str | None:
    """The store key holding the model's layer: same module and extraction pooling."""
    for key in store.layers:
        attrs = store.layer(key).attrs
        if (
            attrs.get("module", key) == layer["module"]
            and attrs.get("pool", "none") == layer["pool"]
        ):
            return key
    return None


def load_model(path: str | os.PathLike) -> FeatxModel:
    """Load a model file written by `featx fit`. This unpickles it, which runs code stored in
    the file: only load model files you trust."""
    import joblib

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist.")
    try:
        payload = joblib.load(path)
    except Exception as error:
        raise UsageError(f"{path} is not a readable model file ({type(error).__name__}).") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise UsageError(f"{path} is not a featx model file.")
    if payload.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise UsageError(
            f"{path} was written by a newer featx (model format {payload['format_version']}); "
            "upgrade featx to read it."
        )
    return FeatxModel(payload["pipeline"], payload["provenance"], path)
