"""A model file's provenance: what makes its features (backbone, weights, preprocessing,
layer), its classes, and what training recorded; built by `model_provenance` and checked on
load by `check_provenance`, field by field against the kinds and ranges featx writes, so that
nothing later (`featx info`, `predict`) meets a value it cannot use."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from featx.backbones.registry import POOLS
from featx.data.preprocessing import Preprocessing
from featx.errors import UsageError
from featx.runtime import library_versions, now, to_json
from featx.store.feature_store import LAYER_JOIN, FeatureStore

__all__ = [
    "check_provenance",
    "combined_layer_record",
    "feature_identity",
    "layer_provenance",
    "layer_record",
    "model_provenance",
    "store_provenance",
]

REQUIRED_PROVENANCE = ("backbone", "weights", "weights_sha256", "preprocessing", "layer")
REQUIRED_LAYER = ("key", "module", "pool", "dtype", "row_shape", "precision")
MAX_IMAGE_SIZE = 8192  # the largest --image-size featx accepts
MAX_ROW_VALUES = 1 << 31
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


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
    record = layer_record(
        key=info.key,
        name=info.attrs.get("layer", info.key),
        module=info.attrs.get("module", info.key),
        pool=info.attrs.get("pool", "none"),
        precision=info.attrs.get("precision", "fp32"),
        dtype=info.dtype,
        row_shape=info.shape,
    )
    if "calibration_engine_key" in info.attrs:  # int8: the quantized model predict runs
        record["calibration_engine_key"] = str(info.attrs["calibration_engine_key"])
    return record


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


class _Wrong(Exception):
    """A provenance field that is not what featx writes: (field, what it should be)."""


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any, low: int = 0, high: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _expect(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise _Wrong(name, what)


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def _check_preprocessing(value: Any) -> None:
    name = "preprocessing"
    _expect(isinstance(value, dict), name, "a JSON object")
    try:
        pre = Preprocessing.from_dict(value)
    except UsageError:
        raise _Wrong(name, "a preprocessing record featx writes") from None
    _expect(_is_count(pre.resize, 1, MAX_IMAGE_SIZE), f"{name}.resize", "a size of 1 to 8192 px")
    _expect(_is_count(pre.crop, 0, pre.resize), f"{name}.crop", "a size up to the resize")
    _expect(pre.interpolation in INTERPOLATIONS, f"{name}.interpolation", "a known resampling")
    _expect(isinstance(pre.square, bool), f"{name}.square", "true or false")
    for field_name in ("mean", "std"):
        numbers = getattr(pre, field_name)
        _expect(
            len(numbers) == 3 and all(_is_number(x) for x in numbers),
            f"{name}.{field_name}",
            "three finite numbers",
        )
    _expect(all(x > 0 for x in pre.std), f"{name}.std", "three numbers above 0")


def _check_layer(layer: Any, name: str, joined: bool) -> None:
    _expect(isinstance(layer, dict), name, "a JSON object")
    for key in REQUIRED_LAYER:
        if key not in layer:
            raise _Wrong(f"{name}.{key}", None)
    for key in ("key", "module", "pool", "precision", "dtype"):
        _expect(_is_text(layer[key]), f"{name}.{key}", "text")
    pools = layer["pool"].split(LAYER_JOIN) if joined else [layer["pool"]]
    _expect(all(p in POOLS for p in pools), f"{name}.pool", f"one of {', '.join(POOLS)}")
    _expect(layer["dtype"] in ("float16", "float32"), f"{name}.dtype", "float16 or float32")
    shape = layer["row_shape"]
    _expect(
        isinstance(shape, list) and shape and all(_is_count(n, 1) for n in shape)
        and math.prod(shape) <= MAX_ROW_VALUES,
        f"{name}.row_shape",
        "a shape",
    )  # fmt: skip


def _check_class_names(names: Any) -> None:
    _expect(
        isinstance(names, list) and len(names) >= 2 and all(_is_text(n) and n for n in names),
        "class_names",
        "a list of two or more names",
    )
    _expect(len(set(names)) == len(names), "class_names", "a list of distinct names")
    _expect(not any(_has_control(n) for n in names), "class_names", "free of control characters")


def _check_optional(p: dict[str, Any]) -> None:
    """The fields `featx info` prints, when present."""
    _expect(p.get("weights_spec") is None or _is_text(p["weights_spec"]), "weights_spec", "text")
    _expect(p.get("params") is None or isinstance(p["params"], dict), "params", "a JSON object")
    versions = p.get("versions")
    _expect(
        versions is None
        or isinstance(versions, dict) and all(v is None or _is_text(v) for v in versions.values()),
        "versions",
        "a JSON object of version texts",
    )  # fmt: skip
    layers = p.get("layers")
    if layers is not None:
        _expect(isinstance(layers, list) and layers, "layers", "a list of layers")
        for i, layer in enumerate(layers):
            _check_layer(layer, f"layers[{i}]", joined=False)
    store = p.get("store")
    _expect(store is None or isinstance(store, dict), "store", "a JSON object")
    for key in ("path", "dataset_root", "dataset_fingerprint"):
        value = (store or {}).get(key)
        _expect(value is None or _is_text(value), f"store.{key}", "text")
    _check_metrics(p.get("metrics"))
    seen = p.get("trained_on")
    if seen:
        _expect(isinstance(seen, dict), "trained_on", "a JSON object")
        _expect(_is_count(seen.get("n_rows")), "trained_on.n_rows", "a count")
        splits = seen.get("splits")
        _expect(
            isinstance(splits, list) and all(_is_text(s) for s in splits),
            "trained_on.splits",
            "a list of split names",
        )
        _expect(_is_text(seen.get("refit")), "trained_on.refit", "text")


def _check_metrics(metrics: Any) -> None:
    if metrics is None:
        return
    _expect(isinstance(metrics, dict), "metrics", "a JSON object")
    for split, values in metrics.items():
        name = f"metrics.{split}"
        _expect(isinstance(values, dict), name, "a JSON object")
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss"):
            value = values.get(key)
            if split == "cv" and isinstance(value, dict):
                value = value.get("mean", 0), value.get("std", 0)
                _expect(all(_is_number(v) for v in value), f"{name}.{key}", "a mean and std")
            else:
                _expect(value is None or _is_number(value), f"{name}.{key}", "a number")


def check_provenance(provenance: Any, path: str | os.PathLike) -> dict[str, Any]:
    """`provenance` if every field featx reads is of the kind and within the range featx
    writes; otherwise a UsageError naming the first field that is missing or wrong."""
    where = f"model file {path}"
    if not isinstance(provenance, dict):
        raise UsageError(f"{where} has provenance that is not a JSON object.")
    for key in (*REQUIRED_PROVENANCE, "class_names"):
        if key not in provenance:
            raise UsageError(f"{where} lacks provenance field {key}.")
    try:
        for key in ("backbone", "weights", "weights_sha256"):
            _expect(_is_text(provenance[key]), key, "text")
        _check_preprocessing(provenance["preprocessing"])
        _check_layer(provenance["layer"], "layer", joined=True)
        _check_class_names(provenance["class_names"])
        _check_optional(provenance)
    except _Wrong as wrong:
        name, what = wrong.args
        if what is None:
            raise UsageError(f"{where} lacks provenance field {name}.") from None
        raise UsageError(f"{where} has a provenance field {name} that is not {what}.") from None
    return provenance
