"""Torch classification heads to and from featx model files.

- `load_fitted_head(path)`: the head of a `featx fit` model whose classifier is an MLP (or a
  fine-tuned head), with the pipeline's linear preprocessing (StandardScaler, PCA) folded into
  its first Linear layer, so it runs directly on the layer's pooled features. An L2 Normalizer
  is not linear and is refused.
- `TorchHead`: a trained head as a fitted scikit-learn classifier, so a fine-tuned network is
  exported as an ordinary featx model file: the backbone with the fine-tuned weights (a
  state-dict file), the feature layer, and `Pipeline([features, TorchHead])`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from featx.backbones import LoadedBackbone, Preprocessing
from featx.errors import UsageError
from featx.network import make_head, probabilities

_CHUNK = 4096


def head_spec(head: nn.Sequential, classes: list[int]) -> dict[str, Any]:
    """A `make_head` head as plain data, in the format of `featx.mlp.MLPClassifier.head_spec`
    (its state dict numbered as `featx.mlp.build_head` lays the layers out)."""
    linears = [m for m in head if isinstance(m, nn.Linear)]
    dropouts = [m.p for m in head if isinstance(m, nn.Dropout)]
    state = {}
    for k, linear in enumerate(linears):  # mlp layout: [Linear, ReLU, Dropout] * k + [Linear]
        state[f"{3 * k}.weight"] = linear.weight.detach().float().cpu().clone()
        state[f"{3 * k}.bias"] = linear.bias.detach().float().cpu().clone()
    return {
        "in_features": linears[0].in_features,
        "hidden_sizes": [m.out_features for m in linears[:-1]],
        "dropout": dropouts[0] if dropouts else 0.0,
        "n_outputs": linears[-1].out_features,
        "binary": linears[-1].out_features == 1,
        "classes": list(classes),
        "state_dict": state,
    }


def head_from_spec(spec: dict[str, Any]) -> nn.Sequential:
    """A head (`make_head` layout) from a spec; accepts `featx.mlp` heads, which lack the
    dropout before a hidden-less final layer (a no-op in eval mode anyway)."""
    head = make_head(spec["in_features"], spec["hidden_sizes"], spec["dropout"], spec["n_outputs"])
    linears = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
    sources = sorted({int(k.split(".")[0]) for k in spec["state_dict"]})
    if len(sources) != len(linears):
        raise UsageError("the model's head does not have the layout of a featx MLP.")
    state = {}
    for source, target in zip(sources, linears, strict=True):
        for name in ("weight", "bias"):
            state[f"{target}.{name}"] = torch.as_tensor(spec["state_dict"][f"{source}.{name}"])
    head.load_state_dict(state)
    return head


class TorchHead(ClassifierMixin, BaseEstimator):
    """A trained torch head (features -> logits) as a fitted scikit-learn classifier.

    Build with `TorchHead.from_head(head, classes)`; it is not trained by `fit`. Pickles as
    plain tensors. `head_spec()` gives the head back, so a fine-tuned model can seed another
    run's head (`featx finetune --head MODEL`).
    """

    def __init__(self, spec: dict[str, Any] | None = None):
        self.spec = spec

    @classmethod
    def from_head(cls, head: nn.Sequential, classes: list[int]) -> TorchHead:
        est = cls(head_spec(head, classes))
        est.classes_ = np.asarray(classes)
        est.n_features_in_ = est.spec["in_features"]
        return est

    def fit(self, X, y=None):
        raise NotImplementedError("TorchHead wraps a head trained by `featx finetune`.")

    def _module(self) -> nn.Sequential:
        module = getattr(self, "_module_cache", None)
        if module is None:
            module = head_from_spec(self.spec).eval()
            self._module_cache = module
        return module

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_module_cache", None)
        return state

    def _logits(self, X) -> torch.Tensor:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"expected {self.n_features_in_} features per row, got shape {X.shape}."
            )
        module = self._module()
        with torch.inference_mode():
            parts = [module(torch.from_numpy(X[i : i + _CHUNK])) for i in range(0, len(X), _CHUNK)]
        return torch.cat(parts) if parts else torch.zeros((0, self.spec["n_outputs"]))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, columns in `classes_` order."""
        return probabilities(self._logits(X)).double().numpy()

    def decision_function(self, X) -> np.ndarray:
        """Logits ((n,) for a single-logit binary head)."""
        logits = self._logits(X).numpy()
        return logits[:, 0] if logits.shape[1] == 1 else logits

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def head_spec(self) -> dict[str, Any]:
        return self.spec


# ---- a featx fit model as the starting head ------------------------------------------------
@dataclass
class FittedHead:
    """A head taken from a model file, with the feature identity it expects."""

    head: nn.Sequential
    layer_module: str
    pool: str  # the Network pool: avg, max, avgmax or flatten
    provenance: dict[str, Any]
    path: Path

    def check(
        self, loaded: LoadedBackbone, preprocessing: Preprocessing, class_names: list[str]
    ) -> None:
        """UsageError unless the model was trained on this backbone, weights, preprocessing
        and these classes."""
        p, where = self.provenance, f"--head {self.path}"
        if p["backbone"] != loaded.name:
            raise UsageError(f"{where} was trained on {p['backbone']} features, not {loaded.name}.")
        if p["weights_sha256"] != loaded.weights_sha256:
            raise UsageError(
                f"{where} was trained on features of other weights ({p['weights']}); "
                f"pass --weights {p.get('weights_spec')}."
            )
        wanted = Preprocessing.from_dict(p["preprocessing"])
        if wanted != preprocessing:
            hint = f"--image-size {wanted.resize}" if wanted.square else "no --image-size"
            raise UsageError(
                f"{where} was trained with preprocessing '{wanted.describe()}'; use {hint}."
            )
        if list(p["class_names"]) != list(class_names):
            raise UsageError(
                f"{where} knows the classes {', '.join(p['class_names'])}, but the data has "
                f"{', '.join(class_names)}."
            )


def load_fitted_head(path: str | Path) -> FittedHead:
    """The torch head of a featx model file whose classifier can give one (an MLP or a
    fine-tuned head), with StandardScaler and PCA steps folded into its first layer."""
    from featx.model import load_model

    model = load_model(path)
    steps = dict(model.pipeline.steps)
    clf = model.pipeline.steps[-1][1]
    where = f"--head {path}"
    if not hasattr(clf, "head_spec"):
        raise UsageError(
            f"{where} holds a {type(clf).__name__}; only an MLP (`featx fit --clf mlp`) or a "
            "fine-tuned model can start the head."
        )
    spec = clf.head_spec()
    n_classes = len(model.class_names)
    if list(spec["classes"]) != list(range(n_classes)):
        raise UsageError(f"{where} was not trained on every class of its data.")
    unknown = [n for n in steps if n not in ("features", "scale", "pca", "clf")]
    if "l2" in steps:
        raise UsageError(f"{where} L2-normalises its features, which a network head cannot fold.")
    if unknown:
        raise UsageError(f"{where} has pipeline steps featx cannot fold: {', '.join(unknown)}.")
    head = head_from_spec(spec)
    first = next(m for m in head if isinstance(m, nn.Linear))
    weight = first.weight.detach().double()
    bias = first.bias.detach().double()
    # Fold from the classifier backwards: W (A x + c) + b = (W A) x + (W c + b).
    if "pca" in steps:
        pca = steps["pca"]
        components = torch.as_tensor(pca.components_, dtype=torch.float64)
        if getattr(pca, "whiten", False):
            components = (
                components
                / torch.as_tensor(np.sqrt(pca.explained_variance_), dtype=torch.float64)[:, None]
            )
        mean = torch.as_tensor(pca.mean_, dtype=torch.float64)
        bias = bias - weight @ (components @ mean)
        weight = weight @ components
    if "scale" in steps:
        scaler = steps["scale"]
        mean = torch.as_tensor(
            scaler.mean_ if scaler.with_mean else np.zeros(weight.shape[1]), dtype=torch.float64
        )
        scale = torch.as_tensor(
            scaler.scale_ if scaler.with_std else np.ones(weight.shape[1]), dtype=torch.float64
        )
        weight = weight / scale
        bias = bias - weight @ mean
    if weight.shape[1] != first.in_features:
        folded = nn.Linear(weight.shape[1], first.out_features)
        index = list(head).index(first)
        head[index] = folded
        first = folded
    with torch.no_grad():
        first.weight.copy_(weight.float())
        first.bias.copy_(bias.float())
    layer = model.layer
    stored_pool = layer.get("pool", "none")
    fit_pool = getattr(steps.get("features"), "pool", "none")
    pool = stored_pool if stored_pool != "none" else fit_pool
    return FittedHead(
        head.train(),
        layer["module"],
        "flatten" if pool == "none" else pool,
        model.provenance,
        Path(path),
    )


# ---- a fine-tuned network as a featx model file ---------------------------------------------
def export_model(
    session: Any,
    out: Path,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    best: dict[str, Any],
    command: str,
) -> Path:
    """Write `out/base.safetensors` (the whole backbone with the fine-tuned weights, loadable
    as `--weights FILE`) and `out/model.joblib`, a featx model file whose pipeline takes the
    feature layer's rows (as `featx extract --weights out/base.safetensors` stores them) and
    whose classifier is the fine-tuned head."""
    from safetensors.torch import save_file
    from sklearn.pipeline import Pipeline

    from featx.backbones import state_dict_sha256
    from featx.classifiers import LayerFeatures
    from featx.extraction import library_versions
    from featx.layers import pooled_shape
    from featx.model import FeatxModel, now
    from featx.store import layer_key

    config, net, record = session.config, session.net, session.record
    weights_path = out / "base.safetensors"
    tmp = weights_path.with_name(f".{weights_path.name}.tmp")
    with net.whole_backbone() as backbone:
        state, seen = {}, set()
        for k, v in backbone.state_dict().items():
            v = v.detach().cpu().contiguous()
            state[k] = v.clone() if v.data_ptr() in seen else v  # safetensors refuses sharing
            seen.add(v.data_ptr())
        save_file(state, str(tmp))
        sha256 = state_dict_sha256(backbone)  # what Backbone.load(weights_path) will compute
    tmp.replace(weights_path)
    weights_spec = str(weights_path.resolve())

    info = session.layer_info
    store_pool = "none" if net.pool == "flatten" else net.pool
    row_shape = list(pooled_shape(info.shape, net.pool))
    classes = list(range(len(session.class_names)))
    pipeline = Pipeline(
        [
            ("features", LayerFeatures("none").fit(np.zeros((1, *row_shape), np.float32))),
            ("clf", TorchHead.from_head(net.head, classes)),
        ]
    )
    augment = config.augment.to_dict() if config.augment is not None else None
    epochs = config.stage_epochs
    provenance = {
        "backbone": record.name,
        "weights": record.weights_identity(weights_spec),
        "weights_spec": weights_spec,
        "weights_sha256": sha256,
        "preprocessing": session.preprocessing.to_dict(),
        "preprocessing_text": session.preprocessing.describe(),
        "layer": {
            "key": layer_key(info.name, store_pool),
            "name": info.name,
            "module": info.module,
            "pool": store_pool,
            "precision": config.precision,
            "dtype": "float32",
            "row_shape": row_shape,
        },
        "class_names": list(session.class_names),
        "store": {
            "path": f"(none: fine-tuned on images, run {out})",
            "dataset_root": str(session.folder.root.resolve()),
            "dataset_fingerprint": session.folder.fingerprint,
            "n_rows": len(session.split.train),
            "augment": augment,
            "created": now(),
            "versions": library_versions(),
        },
        "classifier": "finetune",
        "params": {
            "head": config.head,
            "unfreeze_from": session.unfreeze_from,
            "epochs_head": epochs["head"],
            "epochs": epochs["full"],
            "lr": config.lr,
            "lr_mult": config.lr_mult,
            "optimizer": config.optimizer,
            "schedule": config.schedule,
        },
        "estimator": f"TorchHead({len(pipeline[-1].spec['hidden_sizes'])} hidden layer(s))",
        "pipeline": f"{'flatten' if net.pool == 'flatten' else net.pool + '-pool'} -> "
        "fine-tuned head",
        "selection": f"best of {len(history)} epochs by validation loss (epoch {best['epoch']})",
        "n_train": len(session.split.train),
        "metrics": metrics,
        "augment": augment,
        "finetune": {
            "run": str(out.resolve()),
            "seed": config.seed,
            "original_weights": session.loaded.weights,
            "validation": session.split.how,
        },
        "versions": library_versions(),
        "created": now(),
        "command": command,
    }
    provenance = json.loads(json.dumps(provenance))  # plain JSON types, as stores hold them
    return FeatxModel(pipeline, provenance).save(out / "model.joblib")
