"""Torch classification heads to and from featx model files.

- `load_fitted_head(path)`: the head of a `featx fit` model whose classifier is an MLP, a
  fine-tuned head, or a linear model whose probabilities are exactly a softmax of its linear
  map (logreg; sgd on two classes), with the pipeline's linear preprocessing (StandardScaler,
  PCA) folded into its first Linear layer, so it runs directly on the layer's pooled features.
  An L2 Normalizer is not linear and is refused.
- `TorchHead`: a trained head as a fitted scikit-learn classifier, so a fine-tuned network is
  exported as an ordinary featx model file: the backbone with the fine-tuned weights (a
  state-dict file), the feature layer, and `Pipeline([features, TorchHead])`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn
from torch.nn import functional as F

from featx.backbones.registry import LoadedBackbone
from featx.data.preprocessing import Preprocessing
from featx.errors import UsageError
from featx.models.file import load_model
from featx.models.references import (
    HeadTensors,
    active_head_tensors,
    head_tensors,
    is_head_reference,
    resolve_head_reference,
)

__all__ = [
    "FittedHead",
    "HeadTensors",
    "TorchHead",
    "active_head_tensors",
    "binary_as_pair",
    "classification_loss",
    "head_from_spec",
    "head_spec",
    "head_tensors",
    "is_head_reference",
    "linear_head_spec",
    "load_fitted_head",
    "make_head",
    "probabilities",
    "resolve_head_reference",
]

_CHUNK = 4096


def make_head(
    in_features: int,
    hidden_sizes: Sequence[int],
    dropout: float,
    n_outputs: int,
    *,
    input_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """The one classification head of featx, mapping features to logits:
    `[Dropout(input_dropout)] + [Linear, ReLU, Dropout(dropout)] * len(hidden_sizes) + [Linear]`
    (the input Dropout only when `input_dropout` > 0). A single logit column means binary.

    Linear layers get torch's default initialisation, drawn from `generator` (torch's global
    generator when None)."""
    layers: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout else []
    for width in hidden_sizes:
        layers += [
            nn.utils.skip_init(nn.Linear, in_features, width),
            nn.ReLU(),
            nn.Dropout(dropout),
        ]
        in_features = width
    layers.append(nn.utils.skip_init(nn.Linear, in_features, n_outputs))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=5**0.5, generator=generator)
            bound = layer.in_features**-0.5
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return nn.Sequential(*layers)


def head_spec(head: nn.Sequential, classes: list) -> dict[str, Any]:
    """A `make_head` head as plain data (sizes, dropout, classes, float32 CPU state dict)."""
    linears = [m for m in head if isinstance(m, nn.Linear)]
    first_linear = next(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
    hidden_dropouts = [m.p for m in list(head)[first_linear:] if isinstance(m, nn.Dropout)]
    input_dropouts = [m.p for m in list(head)[:first_linear] if isinstance(m, nn.Dropout)]
    return {
        "in_features": linears[0].in_features,
        "hidden_sizes": [m.out_features for m in linears[:-1]],
        "dropout": hidden_dropouts[0] if hidden_dropouts else 0.0,
        "input_dropout": input_dropouts[0] if input_dropouts else 0.0,
        "n_outputs": linears[-1].out_features,
        "binary": linears[-1].out_features == 1,
        "classes": list(classes),
        "state_dict": {k: v.detach().float().cpu().clone() for k, v in head.state_dict().items()},
    }


def head_from_spec(spec: dict[str, Any]) -> nn.Sequential:
    """The head that `head_spec` describes, with its weights, in eval mode."""
    head = make_head(
        spec["in_features"],
        spec["hidden_sizes"],
        spec["dropout"],
        spec["n_outputs"],
        input_dropout=spec.get("input_dropout", 0.0),
    )
    try:
        head.load_state_dict({k: torch.as_tensor(v) for k, v in spec["state_dict"].items()})
    except RuntimeError:
        raise UsageError("the model's head does not have the layout of a featx MLP.") from None
    return head.eval()


def classification_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy for (n, classes) logits; binary cross-entropy for a single logit column.
    Class weights give a weighted mean, as `nn.CrossEntropyLoss(weight=...)` does."""
    logits = logits.float()
    if logits.shape[1] > 1:
        return F.cross_entropy(logits, target, weight=class_weights, reduction=reduction)
    losses = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
    if class_weights is not None:
        w = class_weights[target]
        return (losses * w).sum() / w.sum() if reduction == "mean" else (losses * w).sum()
    return losses.mean() if reduction == "mean" else losses.sum()


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (n, classes) from logits, sigmoid for a single logit column;
    float64 logits stay float64."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return logits.softmax(dim=1)


class TorchHead(ClassifierMixin, BaseEstimator):
    """A trained torch head (features -> logits) as a fitted scikit-learn classifier.

    Build with `TorchHead.from_head(head, classes)`; it is not trained by `fit`. Pickles as
    plain tensors; in a model file its tensors go to heads.safetensors (see `HeadTensors`).
    `head_spec()` gives the head back, so a fine-tuned model can seed another
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
        state = dict(super().__getstate__())  # for non-sklearn classes, the live __dict__
        state.pop("_module_cache", None)
        heads = active_head_tensors()
        if heads is not None and self.spec is not None:
            state["spec"] = heads.put(self.spec, self)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if is_head_reference(state.get("spec")):
            state = {**state, "spec": resolve_head_reference(state["spec"])}
        super().__setstate__(state)

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
    pool: str  # avg, max, avgmax, or none (the map is flattened)
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
            if wanted.decode != preprocessing.decode:
                hint += f" and --decode {wanted.decode}"
            raise UsageError(
                f"{where} was trained with preprocessing '{wanted.describe()}'; use {hint}."
            )
        if list(p["class_names"]) != list(class_names):
            raise UsageError(
                f"{where} knows the classes {', '.join(p['class_names'])}, but the data has "
                f"{', '.join(class_names)}."
            )


def load_fitted_head(path: str | Path, *, trust_pickle: bool = False) -> FittedHead:
    """The torch head of a featx model file whose classifier can give one (an MLP, a
    fine-tuned head, or a linear model as `linear_head_spec` takes it), with StandardScaler and
    PCA steps folded into its first layer: its softmax on the layer's features is the model's
    `predict_proba`. The file is read by `load_model` (a legacy pickle only with
    `trust_pickle`)."""
    model = load_model(path, trust_pickle=trust_pickle)
    steps = dict(model.pipeline.steps)
    clf = model.pipeline.steps[-1][1]
    where = f"--head {path}"
    spec = clf.head_spec() if hasattr(clf, "head_spec") else linear_head_spec(clf)
    if spec is None:
        raise UsageError(
            f"{where} holds a {type(clf).__name__}, which is neither a network nor a softmax "
            "of a linear map; only a model of `featx fit --clf logreg` or `--clf mlp` (or sgd "
            "on two classes) or of `featx finetune` can start the head."
        )
    if len(model.layers) > 1:
        raise UsageError(
            f"{where} reads several joined layers ({model.layer['key']}); a head starts from "
            "one layer, so fit the model on one layer."
        )
    n_classes = len(model.class_names)
    if list(spec["classes"]) != list(range(n_classes)):
        raise UsageError(f"{where} was not trained on every class of its data.")
    unknown = [n for n in steps if n not in ("features", "scale", "pca", "clf")]
    if "l2" in steps:
        raise UsageError(f"{where} L2-normalises its features, which a network head cannot fold.")
    if unknown:
        raise UsageError(f"{where} has pipeline steps featx cannot fold: {', '.join(unknown)}.")
    head = fold_linear_steps(head_from_spec(spec), steps)
    layer = model.layer
    stored_pool = layer.get("pool", "none")
    fit_pool = getattr(steps.get("features"), "pool", "none")
    pool = stored_pool if stored_pool != "none" else fit_pool
    return FittedHead(
        head.train(),
        layer["module"],
        pool,
        model.provenance,
        Path(path),
    )


def linear_head_spec(clf: Any) -> dict[str, Any] | None:
    """The head spec (one Linear layer, one logit per class) of a fitted scikit-learn
    classifier whose `predict_proba` is exactly the softmax of `X @ coef_.T + intercept_`:
    LogisticRegression (multinomial, or on two classes) and SGDClassifier with log loss on two
    classes (one-vs-rest probabilities are normalised sigmoids, not a softmax). None for any
    other classifier. A binary model's single logit z becomes the pair (0, z), whose softmax
    is (1 - sigmoid(z), sigmoid(z)) (`binary_as_pair`)."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    n_classes = len(getattr(clf, "classes_", ()))
    if isinstance(clf, LogisticRegression):
        ovr = getattr(clf, "multi_class", "auto") == "ovr" or (  # sklearn < 1.8 could do OvR
            getattr(clf, "multi_class", None) == "auto" and clf.solver == "liblinear"
        )
        exact = n_classes == 2 or (n_classes > 2 and not ovr)
    elif isinstance(clf, SGDClassifier):
        exact = n_classes == 2 and clf.loss == "log_loss"
    else:
        return None
    if not exact:
        return None
    weight = torch.from_numpy(np.asarray(clf.coef_, dtype=np.float64))
    bias = torch.from_numpy(np.array(np.broadcast_to(clf.intercept_, (len(weight),)), np.float64))
    if n_classes == 2:
        weight, bias = binary_as_pair(weight, bias)
    return {
        "in_features": weight.shape[1],
        "hidden_sizes": [],
        "dropout": 0.0,
        "input_dropout": 0.0,
        "n_outputs": n_classes,
        "binary": False,
        "classes": clf.classes_.tolist(),
        "state_dict": {"0.weight": weight.float(), "0.bias": bias.float()},
    }


def binary_as_pair(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A binary linear map's single logit z (`weight` (1, d), `bias` (1,)) as one logit per
    class, the pair (0, z), whose softmax is (1 - sigmoid(z), sigmoid(z))."""
    return torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])


def fold_linear_steps(head: nn.Sequential, steps: dict[str, Any]) -> nn.Sequential:
    """`head` with the linear preprocessing of a pipeline (`steps["pca"]`, then
    `steps["scale"]`, fitted scikit-learn PCA / StandardScaler; either may be absent) folded
    into its first Linear layer, so it runs on the unscaled features. Changes `head` in place
    and returns it."""
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
    return head
