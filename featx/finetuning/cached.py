"""Stage 1 from a feature store: the head trains on the store's cached rows of the feature
layer (pooled as the network pools), in seconds, instead of running the frozen base over the
images epoch after epoch.

The store must hold what the frozen base computes: same backbone, weights (by sha256) and
preprocessing, and the feature layer under the network's pooling. Rows are matched to the
run's training and validation images by path; augmented views of a training image
(`featx extract --augment K`) train the head too. The head is featx's MLP estimator
(`featx.classify.mlp.MLPClassifier`) on standardised rows, one `partial_fit` pass per epoch,
keeping the epoch of lowest validation loss; the standardisation is then folded into its first
Linear layer so the network's head runs on the raw features.

Without `--layer`, a store also chooses the layer the head sits on (`best_stored_layer`): a head
trains on every stored layer of the run's pooling, and the one of lowest validation loss wins.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from featx.errors import UsageError
from featx.finetuning.session import Session
from featx.models.heads import binary_as_pair

__all__ = ["CachedRows", "best_stored_layer", "cached_rows", "train_head_on_rows"]

DEFAULT_EPOCHS_CACHED = 100  # stage 1 epochs on cached rows (cheap: early stopping ends it)
PATIENCE_CACHED = 5


@dataclass
class CachedRows:
    """The stored rows of the feature layer for the run's training and validation images."""

    store: str
    key: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def _differences(meta: dict[str, Any], session: Session) -> list[str]:
    from featx.data.preprocessing import Preprocessing

    wanted = session.loaded
    found = []
    if meta.get("backbone") != wanted.name:
        found.append(f"backbone {meta.get('backbone')}, not {wanted.name}")
    if meta.get("weights_sha256") != wanted.weights_sha256:
        found.append(f"weights {meta.get('weights')}, not {wanted.weights}")
    stored = meta.get("preprocessing")
    if stored is None or Preprocessing.from_dict(stored) != session.preprocessing:
        found.append(
            f"preprocessing '{meta.get('preprocessing_text', stored)}', not "
            f"'{session.preprocessing.describe()}'"
        )
    return found


def _open_matching(session: Session, store: str | os.PathLike):
    """The store, open, after checking that it holds what the frozen base computes."""
    from featx.store.feature_store import FeatureStore

    fs = FeatureStore(store)
    differences = _differences(fs.meta, session)
    if differences:
        fs.close()
        raise UsageError(
            f"store {fs.path} was extracted with {'; '.join(differences)}; extract a store "
            "with this run's backbone, weights and preprocessing, or leave out --store."
        )
    return fs


def cached_rows(session: Session, store: str | os.PathLike, key: str | None = None) -> CachedRows:
    """Read the rows of the network's feature layer (or of the stored layer `key`) for the
    run's images from `store`; UsageError in one sentence when the store does not hold what
    the frozen base computes."""
    from featx.store.feature_store import layer_key

    info, pool = session.layer_info, session.net.pool
    with _open_matching(session, store) as fs:
        if key is None:
            key = layer_key(info.name, pool)
        if key not in fs.layers:
            module_key = layer_key(info.module, pool)
            if module_key not in fs.layers:
                raise UsageError(
                    f"store {fs.path} has no layer {key} (the feature layer with {pool} "
                    f"pooling); add it with `featx extract --layer {info.name} --pool {pool}`."
                )
            key = module_key
        paths, views = fs.paths(), fs.views()
        files = session.folder.files
        row_of = {p: i for i, (p, v) in enumerate(zip(paths, views, strict=True)) if v == 0}
        wanted = [files[i].path for i in (*session.split.train, *session.split.validation)]
        missing = [p for p in wanted if p not in row_of]
        if missing:
            raise UsageError(
                f"store {fs.path} has no row for {len(missing)} of the run's images (first: "
                f"{missing[0]}); extract the store from this data folder."
            )
        train_paths = {files[i].path for i in session.split.train}
        train_rows = np.flatnonzero([p in train_paths for p in paths])  # with augmented views
        val_rows = np.array([row_of[files[i].path] for i in session.split.validation])
        labels = fs.labels()
        x_train = fs.read_rows(key, train_rows).reshape(len(train_rows), -1)
        x_val = fs.read_rows(key, val_rows).reshape(len(val_rows), -1)
        return CachedRows(str(fs.path), key, x_train, labels[train_rows], x_val, labels[val_rows])


def best_stored_layer(session: Session, store: str | os.PathLike, log) -> str:
    """The stored layer (of the run's pooling, and not above the network's default feature
    layer) whose head, trained on its cached rows as stage 1 trains it, reaches the lowest
    validation loss; the network's own layer when the store holds no other."""
    with _open_matching(session, store) as fs:
        pool = session.net.pool
        attrs = {key: fs.layer(key).attrs for key in fs.layers}
        candidates = [
            (key, a.get("layer") or a.get("module"))
            for key, a in attrs.items()
            if a.get("pool", "none") == pool
        ]
    reachable = set(session.reachable_layers())
    candidates = [(key, layer) for key, layer in candidates if layer in reachable]
    if len(candidates) < 2:
        return session.layer_info.name
    losses = {}
    for key, layer in candidates:
        rows = cached_rows(session, store, key)
        _, history = _fit_head_on_rows(session, rows, DEFAULT_EPOCHS_CACHED)
        losses[layer] = min(h["val_loss"] for h in history)
    best = min(losses, key=losses.get)
    ranked = ", ".join(f"{layer} {losses[layer]:.4f}" for layer in sorted(losses, key=losses.get))
    log(f"Feature layer from the store: {best} (validation loss of a head on each: {ranked}).")
    return best


def train_head_on_rows(
    session: Session, rows: CachedRows, epochs: int, log, *, keep_last: bool = False
) -> list[dict[str, Any]]:
    """Train the network's head on cached rows for up to `epochs` epochs (early stopping on
    the validation rows); the head ends with the weights of the best epoch, or with
    `keep_last` after exactly `epochs` epochs. Returns one history entry per epoch."""
    head, history = _fit_head_on_rows(session, rows, epochs, keep_last=keep_last)
    _copy_linears(head, session.net.head)
    seconds = sum(h["seconds"] for h in history)
    if keep_last:
        log(f"Stage 1 on the cached rows of {rows.key}: {len(history)} epochs in {seconds:.1f} s.")
        return history
    best = min(history, key=lambda h: h["val_loss"])
    log(
        f"Stage 1 on the cached rows of {rows.key} in {rows.store}: {len(history)} epochs in "
        f"{seconds:.1f} s, best epoch {best['epoch']} "
        f"(validation loss {best['val_loss']:.4f}, accuracy {best['val_accuracy']:.4f})."
    )
    return history


def _fit_head_on_rows(
    session: Session, rows: CachedRows, epochs: int, *, keep_last: bool = False
) -> tuple[nn.Sequential, list[dict[str, Any]]]:
    """A head shaped like the network's, trained on `rows`: its best epoch by validation
    loss (with `keep_last`, its last of `epochs` epochs), with the standardisation folded in,
    and one history entry per epoch."""
    from sklearn.preprocessing import StandardScaler

    from featx.classify.mlp import MLPClassifier
    from featx.models.heads import classification_loss, fold_linear_steps

    config = session.config
    n_classes = len(session.class_names)
    hidden = [m.out_features for m in session.net.head if isinstance(m, nn.Linear)][:-1]
    scaler = StandardScaler().fit(rows.x_train)
    x_train, x_val = scaler.transform(rows.x_train), scaler.transform(rows.x_val)
    mlp = MLPClassifier(
        hidden_sizes=tuple(hidden),
        dropout=config.dropout,
        optimizer="adam",
        learning_rate=config.stage_lr("head"),
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        early_stopping=False,
        random_state=config.seed,
    )
    classes = np.arange(n_classes)
    y_val = torch.from_numpy(rows.y_val.astype(np.int64))
    history: list[dict[str, Any]] = []
    best_loss, best_state, bad = np.inf, None, 0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        with _one_thread():
            mlp.partial_fit(x_train, rows.y_train, classes=classes)
            head = _as_network_head(mlp.module_, n_classes)
            with torch.inference_mode():
                logits = head.eval()(torch.from_numpy(x_val.astype(np.float32)))
                val_loss = float(classification_loss(logits, y_val))
                val_accuracy = float((logits.argmax(1) == y_val).float().mean())
                train_pred = mlp.predict(x_train)
        seconds = time.perf_counter() - started
        history.append(
            {
                "epoch": epoch,
                "stage": "head",
                "stage_epoch": epoch,
                "source": "store",
                "train_loss": mlp.loss_curve_[-1],
                "train_accuracy": float((train_pred == rows.y_train).mean()),
                "seconds": seconds,
                "images_per_second": len(x_train) / seconds if seconds else 0.0,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": {"head": config.stage_lr("head")},
            }
        )
        if val_loss < best_loss or keep_last:
            best_loss, bad = val_loss, 0
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            bad += 1
            if bad >= PATIENCE_CACHED:
                break
    best_head = _as_network_head(mlp.module_, n_classes)
    best_head.load_state_dict(best_state)
    fold_linear_steps(best_head, {"scale": scaler})
    return best_head, history


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Small-batch MLP steps are too small to share between threads: on a loaded 2-core
    machine one epoch over 800 rows took 0.4 s with one torch thread and 20 s with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_network_head(head: nn.Sequential, n_classes: int) -> nn.Sequential:
    """A copy of an MLPClassifier head with one logit per class (a binary head's single logit as
    `binary_as_pair`)."""
    import copy

    head = copy.deepcopy(head).cpu()
    last = head[-1]
    if last.out_features == n_classes:
        return head
    pair = nn.Linear(last.in_features, n_classes)
    with torch.no_grad():
        weight, bias = binary_as_pair(last.weight, last.bias)
        pair.weight.copy_(weight)
        pair.bias.copy_(bias)
    head[-1] = pair
    return head


def _copy_linears(source: nn.Sequential, target: nn.Sequential) -> None:
    """Copy the Linear layers of `source` into those of `target`, in order (a linear network
    head starts with an input Dropout that the estimator's head does not have)."""
    pairs = zip(
        (m for m in source if isinstance(m, nn.Linear)),
        (m for m in target if isinstance(m, nn.Linear)),
        strict=True,
    )
    with torch.no_grad():
        for src, dst in pairs:
            dst.weight.copy_(src.weight.to(dst.weight.device))
            dst.bias.copy_(src.bias.to(dst.bias.device))
