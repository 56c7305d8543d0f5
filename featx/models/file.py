"""The model file: a fitted pipeline and where its features come from.

A model file (format version 2) is a zip archive whose loading runs no code:

    provenance.json     {"format": "featx-model", "format_version": 2, backbone, weights,
                         weights_spec, weights_sha256, preprocessing,
                         layer{key, name, module, pool, dtype, row_shape, precision},
                         class_names, store{path, fingerprint, ...}, classifier, params,
                         pipeline config, selection, metrics, versions, created, command}
    pipeline.skops      the fitted scikit-learn Pipeline (input: rows of the layer as stored),
                        written by `skops.io`; loaded only if every type in it is one that
                        featx builds (`featx.models.trusted`)
    heads.json          torch heads (of `mlp` and fine-tuned models): sizes, dropout, classes
    heads.safetensors   their tensors, "head0/0.weight" ...

`FeatxModel.save` is the one writer, `load_model` the one reader, `check_provenance` the one
validator. Version 1 files were joblib pickles: `load_model` opens them only with
`trust_pickle=True`, since unpickling runs code stored in the file.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featx.data.preprocessing import Preprocessing
from featx.errors import UsageError
from featx.models.archive import (
    HEADS,
    HEADS_SPEC,
    PIPELINE,
    PROVENANCE,
    check_sizes,
    pipeline_types,
    read_member,
    reason,
)
from featx.models.checks import check_pipeline
from featx.models.provenance import (
    check_provenance,
    combined_layer_record,
    feature_identity,
    layer_provenance,
    layer_record,
    model_provenance,
    store_provenance,
)
from featx.models.references import HeadTensors, head_tensors
from featx.models.trusted import trust_types, trusted_types
from featx.runtime import atomic_write, human_size, to_json
from featx.store.feature_store import LAYER_JOIN, FeatureStore

if TYPE_CHECKING:  # scikit-learn loads with a model, not for `featx info STORE`
    from sklearn.pipeline import Pipeline

__all__ = [
    "FeatxModel",
    "check_provenance",
    "combined_layer_record",
    "feature_identity",
    "layer_provenance",
    "layer_record",
    "legacy_message",
    "load_model",
    "model_file_kind",
    "model_provenance",
    "store_provenance",
]

MODEL_FORMAT = "featx-model"
MODEL_FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1  # a joblib pickle


trust_types("featx.models.heads:TorchHead")


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
        import skops.io
        from safetensors.torch import save as save_tensors

        path = Path(path)
        heads = HeadTensors()
        with head_tensors(heads):
            pipeline = skops.io.dumps(self.pipeline)
        provenance = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            **self.provenance,
        }
        members = {
            PROVENANCE: json.dumps(provenance, indent=1, default=to_json).encode(),
            PIPELINE: pipeline,
        }
        if heads.specs:
            members[HEADS_SPEC] = json.dumps(heads.specs, indent=1, default=to_json).encode()
            members[HEADS] = save_tensors(heads.tensors)

        def write(fh) -> None:
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in members.items():
                    zf.writestr(name, data)

        atomic_write(path, write)
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
        store = p.get("store") or {}
        size = f"  ({human_size(self.path.stat().st_size)})" if self.path else ""
        params = ", ".join(f"{k}={v!r}" for k, v in (p.get("params") or {}).items()) or "defaults"
        lines = [
            f"model       {self.path or '(not saved)'}{size}",
            f"classifier  {p.get('classifier')} ({params})",
            f"estimator   {p.get('estimator')}",
            f"pipeline    {p.get('pipeline')}",
            *(
                f"layer       {layer['key']}  (module {layer['module']}, "
                f"{'x'.join(map(str, layer['row_shape']))} {layer['dtype']}, "
                f"pooled at extraction: {layer['pool']})"
                for layer in self.layers
            ),
            f"backbone    {p['backbone']}",
            f"weights     {p['weights']}  sha256 {p['weights_sha256'][:16]}  "
            f"(load as --weights {p.get('weights_spec')})",
            f"preprocess  {p.get('preprocessing_text')}",
            f"classes     {len(p['class_names'])}: {', '.join(p['class_names'][:20])}"
            + (" ..." if len(p["class_names"]) > 20 else ""),
            f"store       {store.get('path')}",
            f"dataset     {store.get('dataset_root')}  "
            f"(fingerprint {str(store.get('dataset_fingerprint'))[:16]})",
            f"selection   {p.get('selection')}",
            f"trained on  {_trained_on(p)}",
        ]
        for split, metrics in (p.get("metrics") or {}).items():
            lines.append(f"metrics     {_metrics_line(split, metrics)}")
        versions = p.get("versions", {})
        lines.append(
            f"created     {p.get('created')}  featx {versions.get('featx')}, scikit-learn "
            f"{versions.get('scikit-learn')}, torch {versions.get('torch')}"
        )
        if p.get("command"):
            lines.append(f"command     {p['command']}")
        # a file's text must not drive the terminal (escape sequences in a name or command)
        return "\n".join(
            "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in line) for line in lines
        )


def _trained_on(p: dict[str, Any]) -> str:
    """Which rows the final model saw; files written before refit record only a count."""
    streamed = " (streamed from the store)" if p.get("streamed") else ""
    seen = p.get("trained_on")
    if not seen:
        return f"{p.get('n_train')} rows{streamed}"
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


# Plain data that skops rebuilds without calling anything.
_PLAIN_TYPES = {
    *(f"builtins.{t}" for t in ("dict", "list", "tuple", "str", "int", "float", "bool")),
    "builtins.NoneType",
    "numpy.ndarray",
    "numpy.dtype",
    *(
        f"numpy.{t}"
        for t in (
            "bool_", "float16", "float32", "float64", "int8", "int16", "int32", "int64",
            "uint8", "uint16", "uint32", "uint64", "str_",
        )
    ),
}  # fmt: skip


def model_file_kind(path: str | os.PathLike) -> str:
    """What a file looks like from its first bytes: "zip" (a featx model file, or another
    zip), "pickle" (a version 1 featx model, or another pickle), "hdf5", or "other"."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return "other"


def legacy_message(path: str | os.PathLike) -> str:
    return (
        f"{path} is a pickle-based model file from an older featx; loading it can run code: "
        "pass --trust-pickle if you trust its source, or refit."
    )


def _load_zip(path: Path) -> FeatxModel:
    import skops.io
    from safetensors.torch import load as load_tensors

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UsageError(
            f"{path} is a damaged or truncated zip file, not a featx model file."
        ) from None
    packed = path.stat().st_size
    with zf:
        names = set(zf.namelist())
        if PROVENANCE not in names or PIPELINE not in names:
            missing = PROVENANCE if PROVENANCE not in names else PIPELINE
            raise UsageError(f"{path} is not a featx model file (the zip has no {missing}).")
        check_sizes(zf, path, packed)
        try:
            provenance = json.loads(read_member(zf, PROVENANCE, path, packed))
            if not isinstance(provenance, dict) or provenance.get("format") != MODEL_FORMAT:
                raise UsageError(f"{path} is not a featx model file (no featx-model format).")
            version = provenance.get("format_version")
            if not isinstance(version, int) or version < MODEL_FORMAT_VERSION:
                raise UsageError(f"model file {path} has an unknown format version {version!r}.")
            if version > MODEL_FORMAT_VERSION:
                raise UsageError(
                    f"{path} was written by a newer featx (model format {version}); "
                    "upgrade featx to read it."
                )
            provenance = check_provenance(
                {k: v for k, v in provenance.items() if k not in ("format", "format_version")},
                path,
            )
            pipeline_bytes = read_member(zf, PIPELINE, path, packed)
            heads = HeadTensors()
            if HEADS_SPEC in names or HEADS in names:
                specs = json.loads(read_member(zf, HEADS_SPEC, path, packed))
                if not isinstance(specs, dict):
                    raise UsageError(f"model file {path} has a {HEADS_SPEC} that is not an object.")
                tensors = load_tensors(read_member(zf, HEADS, path, packed))
                heads = HeadTensors(specs, tensors)
        except UsageError:
            raise
        except Exception as error:  # json, zlib, CRC and safetensors errors of a damaged member
            raise UsageError(f"model file {path} is damaged ({reason(error)}).") from None
    try:
        named = pipeline_types(pipeline_bytes, path)
        untrusted = skops.io.get_untrusted_types(data=pipeline_bytes)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"model file {path} has a damaged {PIPELINE} ({reason(error)}).") from None
    # skops trusts many types by default (any scikit-learn estimator, for one); featx loads
    # only the ones it builds itself, and plain data.
    allowed = {*trusted_types(), *_PLAIN_TYPES}
    refused = sorted((named | set(untrusted)) - allowed)
    if refused:
        raise UsageError(
            f"model file {path} holds types that featx does not build and will not load: "
            f"{', '.join(refused)}."
        )
    try:
        with head_tensors(heads):
            pipeline = skops.io.loads(pipeline_bytes, trusted=untrusted)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"model file {path} has a damaged {PIPELINE} ({reason(error)}).") from None
    from sklearn.pipeline import Pipeline

    if not isinstance(pipeline, Pipeline):
        raise UsageError(f"model file {path} holds a {type(pipeline).__name__}, not a Pipeline.")
    check_pipeline(pipeline, path, len(provenance["class_names"]))
    return FeatxModel(pipeline, provenance, path)


def _load_pickle(path: Path) -> FeatxModel:
    import joblib

    try:
        payload = joblib.load(path)
    except Exception as error:
        raise UsageError(f"{path} is not a readable model file ({type(error).__name__}).") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise UsageError(f"{path} is not a featx model file.")
    if payload.get("format_version") != LEGACY_FORMAT_VERSION:
        raise UsageError(f"{path} is a pickle with an unknown featx model format version.")
    from sklearn.pipeline import Pipeline

    if not isinstance(payload.get("pipeline"), Pipeline):
        raise UsageError(f"{path} holds no scikit-learn Pipeline.")
    return FeatxModel(payload["pipeline"], check_provenance(payload.get("provenance"), path), path)


def load_model(path: str | os.PathLike, trust_pickle: bool = False) -> FeatxModel:
    """Load a model file written by `featx fit` or `featx finetune`. Loading runs no code
    from the file: only the types featx builds are rebuilt. A version 1 (joblib pickle) file
    is unpickled only with `trust_pickle=True`, since that runs code stored in it; save the
    result to convert it."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give the path of a model file.")
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist.")
    try:
        kind = model_file_kind(path)
    except OSError as error:
        raise UsageError(f"cannot read model file {path} ({error.strerror}).") from None
    if kind == "zip":
        return _load_zip(path)
    if kind == "pickle":
        if not trust_pickle:
            raise UsageError(legacy_message(path))
        return _load_pickle(path)
    raise UsageError(f"{path} is not a featx model file.")
