"""A small torch MLP classifier head that behaves as a scikit-learn estimator."""

from __future__ import annotations

import copy
import os
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state, check_scalar
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from featx.models.heads import (
    active_head_tensors,
    classification_loss,
    head_from_spec,
    head_spec,
    is_head_reference,
    make_head,
    probabilities,
    resolve_head_reference,
)

__all__ = ["MLPClassifier"]

_OPTIMIZERS = ("rmsprop", "adam", "sgd")
_DTYPES = (np.float32, np.float64, np.float16)  # anything else is converted to float32
_CHUNK = 8192  # rows per forward pass when not training


def _train_forward(head: nn.Sequential, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Forward pass with dropout masks drawn from `gen`, leaving torch's global RNG alone."""
    for layer in head:
        if isinstance(layer, nn.Dropout):
            if layer.p > 0:
                keep = torch.empty(x.shape).bernoulli_(1 - layer.p, generator=gen)
                x = x * keep.to(x.device) / (1 - layer.p)
        else:
            x = layer(x)
    return x


def _to_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32)).to(device)


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: _to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_to_cpu(value) for value in tree]
    return tree


class MLPClassifier(ClassifierMixin, BaseEstimator):
    """Multi-layer perceptron classifier on feature vectors, trained with torch.

    The network is ``Linear -> ReLU -> Dropout`` per hidden layer followed by a
    linear output: softmax over the classes for multiclass problems, a single
    sigmoid unit for binary ones.  Training and inference run in float32.

    Parameters
    ----------
    hidden_sizes : int or sequence of int, default=(256,)
        Width of each hidden layer; ``()`` gives a linear (logistic) classifier.
    dropout : float, default=0.5
        Dropout probability after each hidden layer, in ``[0, 1)``.
    optimizer : {"rmsprop", "adam", "sgd"}, default="rmsprop"
        Gradient-descent algorithm.
    learning_rate : float, default=1e-3
        Step size of the optimizer.
    weight_decay : float, default=0.0
        L2 penalty coupled into the gradient, as in torch optimizers.
    momentum : float, default=0.9
        Momentum of ``optimizer="sgd"``; ignored otherwise.
    epochs : int, default=50
        Maximum number of passes over the training data in `fit`.
    batch_size : int, default=64
        Mini-batch size.
    early_stopping : bool, default=True
        Hold out `validation_fraction` of the data in `fit`, stop once the
        validation loss has not improved for `patience` epochs and keep the
        weights of the best epoch.  The split is stratified when every class is
        large enough, random otherwise.
    validation_fraction : float, default=0.1
        Share of the training data held out for early stopping, in ``(0, 1)``.
    patience : int, default=5
        Epochs without improvement of the validation loss before stopping.
    random_state : int, RandomState instance or None, default=0
        Seeds weight initialisation, the validation split, shuffling and dropout.
        The global numpy and torch generators are left untouched unless None.
    device : str or torch.device, default="cpu"
        Where the network trains and predicts.
    verbose : bool, default=False
        Print the losses after every epoch.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels, in the order of the `predict_proba` columns.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Feature names, when `X` had string column names.
    module_ : torch.nn.Sequential
        The trained network, mapping features to logits.
    loss_curve_ : list of float
        Mean training loss of each epoch (or `partial_fit` call).
    validation_loss_curve_ : list of float
        Validation loss after each epoch; empty without early stopping.
    best_epoch_ : int
        Epoch (1-based) whose weights were kept.
    n_iter_ : int
        Number of epochs run, plus one per `partial_fit` call.
    """

    def __init__(
        self,
        hidden_sizes=(256,),
        dropout=0.5,
        optimizer="rmsprop",
        learning_rate=1e-3,
        weight_decay=0.0,
        momentum=0.9,
        epochs=50,
        batch_size=64,
        early_stopping=True,
        validation_fraction=0.1,
        patience=5,
        random_state=0,
        device="cpu",
        verbose=False,
    ):
        self.hidden_sizes = hidden_sizes
        self.dropout = dropout
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.epochs = epochs
        self.batch_size = batch_size
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def fit(self, X, y) -> MLPClassifier:
        """Train a new network on features `X` of shape (n_samples, n_features) and labels `y`."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=_DTYPES)
        check_classification_targets(y)
        classes, y = np.unique(y, return_inverse=True)
        rng, gen = self._rngs()
        self._init_module(classes, X.shape[1], gen)
        train, val = self._split(y, rng)
        optimizer = self._make_optimizer()
        self.loss_curve_, self.validation_loss_curve_ = [], []
        best_loss, best_state, self.best_epoch_ = np.inf, None, 0
        for epoch in range(1, self.epochs + 1):
            self.loss_curve_.append(self._train_epoch(X, y, train, optimizer, rng, gen))
            if val is None:
                self._report(epoch)
                continue
            val_loss = self._mean_loss(X, y, val)
            self.validation_loss_curve_.append(val_loss)
            self._report(epoch, val_loss)
            if val_loss < best_loss:
                best_loss, best_state, self.best_epoch_ = val_loss, self._state_copy(), epoch
            elif epoch - self.best_epoch_ >= self.patience:
                break
        self.n_iter_ = epoch
        if best_state is None:
            self.best_epoch_ = epoch
        else:
            self.module_.load_state_dict(best_state)
        self._optimizer_state = (self.optimizer, _to_cpu(optimizer.state_dict()))
        return self

    def partial_fit(self, X, y, classes=None) -> MLPClassifier:
        """Train for one pass over `X`, `y`, e.g. one chunk of a larger store.

        `classes` (all labels that will ever occur) is required on the first
        call.  A fitted estimator continues from its current weights.  No
        validation data is held out.
        """
        self._check_params()
        first_call = not hasattr(self, "classes_")
        if first_call and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        X, y = validate_data(self, X, y, dtype=_DTYPES, reset=first_call)
        check_classification_targets(y)
        known = np.unique(classes) if first_call else self.classes_
        if classes is not None and not np.array_equal(np.unique(classes), known):
            raise ValueError(f"classes={classes!r} differs from classes_={known!r}.")
        unknown = ~np.isin(y, known)
        if unknown.any():
            raise ValueError(f"y contains labels not in classes: {np.unique(y[unknown])!r}.")
        y = np.searchsorted(known, y)
        rng, gen = self._rngs(offset=getattr(self, "n_iter_", 0))
        if first_call:
            self._init_module(known, X.shape[1], gen)
            self.loss_curve_, self.validation_loss_curve_, self.n_iter_ = [], [], 0
        optimizer = self._make_optimizer()
        name, state = self._optimizer_state
        if name == self.optimizer:  # continue with the optimizer's running statistics
            optimizer.load_state_dict(state)
        self.loss_curve_.append(self._train_epoch(X, y, np.arange(len(y)), optimizer, rng, gen))
        self.n_iter_ += 1
        self.best_epoch_ = self.n_iter_
        self._report(self.n_iter_)
        self._optimizer_state = (self.optimizer, _to_cpu(optimizer.state_dict()))
        return self

    def decision_function(self, X) -> np.ndarray:
        """Logits of shape (n_samples,) for binary problems, (n_samples, n_classes) otherwise."""
        logits = self._logits(X)
        return logits[:, 0] if len(self.classes_) == 2 else logits

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities of shape (n_samples, n_classes), columns in `classes_` order."""
        logits = torch.from_numpy(self._logits(X).astype(np.float64))
        return probabilities(logits).numpy()

    def predict(self, X) -> np.ndarray:
        """Most probable class label of each sample."""
        logits = self._logits(X)
        if len(self.classes_) == 2:
            return self.classes_[(logits[:, 0] > 0).astype(int)]
        return self.classes_[logits.argmax(axis=1)]

    def head_spec(self) -> dict[str, Any]:
        """Plain-data description of the fitted network, for `featx.models.heads.head_from_spec`
        and fine-tuning."""
        check_is_fitted(self)
        return head_spec(self.module_, self.classes_.tolist())

    def save_head(self, path: str | os.PathLike) -> None:
        """Write `head_spec()` to `path`, loadable with `torch.load(path, weights_only=True)`."""
        torch.save(self.head_spec(), path)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # for non-sklearn classes, the live __dict__
        if "module_" not in state:
            return state
        heads = active_head_tensors()
        if heads is None:  # pickle on CPU so that the estimator loads anywhere
            state["module_"] = copy.deepcopy(self.module_).cpu()
        else:  # a model file: the head goes to safetensors, no torch type reaches skops
            state["module_"] = heads.put(head_spec(self.module_, self.classes_.tolist()), self)
            # The optimizer's running statistics only serve `partial_fit` in this process.
            state["_optimizer_state"] = (None, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if is_head_reference(state.get("module_")):
            state = {**state, "module_": head_from_spec(resolve_head_reference(state["module_"]))}
        super().__setstate__(state)

    def _check_params(self) -> None:
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}.")
        for i, width in enumerate(self._hidden_sizes()):
            check_scalar(width, f"hidden_sizes[{i}]", Integral, min_val=1)
        check_scalar(self.dropout, "dropout", Real, min_val=0, max_val=1, include_boundaries="left")
        check_scalar(
            self.learning_rate, "learning_rate", Real, min_val=0, include_boundaries="neither"
        )
        check_scalar(self.weight_decay, "weight_decay", Real, min_val=0)
        check_scalar(self.momentum, "momentum", Real, min_val=0)
        check_scalar(self.epochs, "epochs", Integral, min_val=1)
        check_scalar(self.batch_size, "batch_size", Integral, min_val=1)
        check_scalar(
            self.validation_fraction,
            "validation_fraction",
            Real,
            min_val=0,
            max_val=1,
            include_boundaries="neither",
        )
        check_scalar(self.patience, "patience", Integral, min_val=1)

    def _hidden_sizes(self) -> list[int]:
        sizes = self.hidden_sizes
        return [sizes] if isinstance(sizes, Integral) else list(sizes)

    def _rngs(self, offset: int = 0) -> tuple[np.random.RandomState, torch.Generator]:
        """Generators for this call, derived from `random_state` and `offset`."""
        base = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
        rng = np.random.RandomState([base, offset])
        return rng, torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))

    def _init_module(self, classes: np.ndarray, n_features: int, gen: torch.Generator) -> None:
        """Set `classes_` and a freshly initialised `module_`."""
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes; got 1 class."
            )
        self.classes_ = classes
        n_outputs = 1 if len(classes) == 2 else len(classes)
        head = make_head(n_features, self._hidden_sizes(), self.dropout, n_outputs, generator=gen)
        self.module_ = head.eval()
        self._optimizer_state = (None, None)

    def _split(
        self, y: np.ndarray, rng: np.random.RandomState
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Training and validation row indices (validation is None without early stopping)."""
        rows = np.arange(len(y))
        if not self.early_stopping:
            return rows, None
        kwargs = {"test_size": self.validation_fraction, "random_state": rng}
        try:
            return train_test_split(rows, stratify=y, **kwargs)
        except ValueError:  # a class too small to be split
            return train_test_split(rows, **kwargs)

    def _state_copy(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.module_.state_dict().items()}

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = self.module_.to(self.device).parameters()  # moves module_ in place
        kwargs = {"lr": self.learning_rate, "weight_decay": self.weight_decay}
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, momentum=self.momentum, **kwargs)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, **kwargs)
        return torch.optim.RMSprop(params, **kwargs)

    def _loss(self, logits: torch.Tensor, y: np.ndarray, reduction: str = "mean") -> torch.Tensor:
        target = torch.from_numpy(y).to(logits.device)
        return classification_loss(logits, target, reduction=reduction)

    def _train_epoch(self, X, y, rows, optimizer, rng, gen) -> float:
        """One shuffled pass over `rows`; returns the mean training loss."""
        device = torch.device(self.device)
        rows = rows[rng.permutation(len(rows))]
        total = 0.0
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            loss = self._loss(
                _train_forward(self.module_, _to_tensor(X[batch], device), gen), y[batch]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        return total / len(rows)

    def _mean_loss(self, X, y, rows) -> float:
        device = torch.device(self.device)
        total = 0.0
        with torch.inference_mode():
            for start in range(0, len(rows), _CHUNK):
                batch = rows[start : start + _CHUNK]
                logits = self.module_(_to_tensor(X[batch], device))
                total += self._loss(logits, y[batch], reduction="sum").item()
        return total / len(rows)

    def _logits(self, X) -> np.ndarray:
        """float32 logits of shape (n_samples, n_outputs)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=_DTYPES, reset=False)
        device = torch.device(self.device)
        module = self.module_.to(device)
        with torch.inference_mode():
            out = [
                module(_to_tensor(X[i : i + _CHUNK], device)).cpu()
                for i in range(0, len(X), _CHUNK)
            ]
        return torch.cat(out).numpy()

    def _report(self, epoch: int, validation_loss: float | None = None) -> None:
        if self.verbose:
            message = f"epoch {epoch}: loss {self.loss_curve_[-1]:.4f}"
            if validation_loss is not None:
                message += f", validation loss {validation_loss:.4f}"
            print(message)
