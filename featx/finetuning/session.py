"""A fine-tuning session: the network on its device, its training data, and one epoch of
training or evaluation. `featx.finetuning.run` drives the stages; the learning-rate finder
reuses the same session."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from featx.backbones.layers import resolve_layers, trace_layers
from featx.backbones.registry import Backbone, LoadedBackbone, get_backbone
from featx.data.folders import (
    ImageFolder,
)
from featx.errors import UsageError
from featx.finetuning.config import FinetuneConfig
from featx.finetuning.data import Split, TrainingData, mix_seed
from featx.finetuning.network import build_network
from featx.finetuning.optimisation import make_optimizer, make_scheduler
from featx.models.heads import (
    FittedHead,
    classification_loss,
    load_fitted_head,
    probabilities,
)
from featx.runtime import (
    autocast,
    default_workers,
    resolve_device,
)

__all__ = ["Session"]


def _decode(
    config: FinetuneConfig, fitted: FittedHead | None, store: str | os.PathLike | None
) -> str:
    """The run's decode policy: as asked, else the fitted head's, else the store's (full for
    one recorded before the choice existed), else reduced."""
    if config.decode is not None:
        return config.decode
    if fitted is not None:
        return fitted.provenance["preprocessing"].get("decode", "full")
    if store is not None:
        from featx.store.feature_store import FeatureStore

        with FeatureStore(store) as features:
            return features.meta["preprocessing"].get("decode", "full")
    return "reduced"


class Session:
    """A network on its device with its training data: what both fine-tuning and the
    learning-rate finder work on. The data is `self.data` (`TrainingData`), the network
    `self.net`; optimisers and schedules come from `featx.finetuning.optimisation`."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        config: FinetuneConfig,
        *,
        workers: int | None = None,
        device: str = "auto",
        quiet: bool = False,
        fitted: FittedHead | None = None,
        store: str | os.PathLike | None = None,
        merge_validation: bool = False,
    ):
        """`store`: the feature store the head trains on, whose decoding the run keeps unless
        `config.decode` says otherwise (as it keeps a fitted head's). `merge_validation`: the
        validation images train too (the retraining of `--refit all`)."""
        self.config = config
        self.store = store
        self.quiet = quiet
        self.layer_from_store = False  # set when a --store chose the feature layer
        self.device = resolve_device(device)
        autocast(self.device, config.precision)  # refuses fp16 on a CPU before any work
        self.record: Backbone = get_backbone(config.backbone)
        if fitted is None and config.fitted_head:
            fitted = load_fitted_head(config.head)
        preprocessing = self.record.default_preprocessing(config.weights)
        if config.image_size:
            preprocessing = preprocessing.with_image_size(config.image_size)
        self.preprocessing = preprocessing.with_decode(_decode(config, fitted, store))
        self.workers = default_workers() if workers is None else workers
        self.data = TrainingData(
            data_dir, config, self.preprocessing, self.workers, self.device.type == "cuda",
            merge_validation,
        )  # fmt: skip
        self.loaded: LoadedBackbone = self.record.load(config.weights)
        self._build_network(fitted)
        weights = self.data.class_weights() if config.class_weights == "balanced" else None
        self.class_weights = (
            None
            if weights is None
            else torch.tensor(weights, dtype=torch.float32, device=self.device)
        )

    def _build_network(self, fitted: FittedHead | None) -> None:
        config = self.config
        layer, pool = config.layer, config.pool or "avg"
        if fitted is not None:
            fitted.check(self.loaded, self.preprocessing, self.class_names)
            layer, pool = fitted.layer_module, fitted.pool
            wanted = config.layer and self.record.module_path(config.layer)
            if (wanted and wanted != layer) or (config.pool and config.pool != pool):
                raise UsageError(
                    f"--head {config.head} sits on layer {fitted.layer_module} with {pool} "
                    "pooling; leave out --layer and --pool, or give those."
                )
        hidden = [config.hidden] if config.hidden and config.head == "mlp" else []
        input_size = self.preprocessing.input_size
        infos = trace_layers(self.record, self.loaded.model, input_size)
        self.layer_infos = infos
        self.net, self.layer_info = build_network(
            self.record,
            self.loaded.model,
            input_size,
            len(self.class_names),
            layer=layer,
            pool=pool,
            hidden_sizes=hidden,
            dropout=config.dropout,
            head=fitted.head if fitted is not None else None,
            seed=config.seed,
            infos=infos,
        )
        if config.unfreeze_from is None:
            self.unfreeze_start = self.net.default_unfreeze_start()
        else:
            info = resolve_layers(self.record, infos, [config.unfreeze_from])[0]
            self.unfreeze_start = self.net.start_of(self.record, info)
        self.unfreeze_from = self.net.unfreeze_layer_name(self.record, self.unfreeze_start)
        self.net.to(self.device)
        if self.device.type != "mps":
            self.net.to(memory_format=torch.channels_last)

    def reachable_layers(self) -> list[str]:
        """Names (and module paths) of the backbone's spatial layers a head could sit on."""
        return [n for i in self.layer_infos if len(i.shape) == 3 for n in (i.name, i.module)]

    # ---- the data, as the rest of featx reads it ------------------------------------------
    @property
    def folder(self) -> ImageFolder:
        return self.data.folder

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def split(self) -> Split:
        return self.data.split

    @property
    def skipped(self) -> dict[str, str]:
        return self.data.skipped

    def training_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The (x, y) batches of one training epoch; unreadable files are skipped."""
        return self.data.batches("train", epoch)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.device.type != "mps":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    # ---- stages -------------------------------------------------------------------------
    def stage_start(self, stage: str) -> int | None:
        """Where the trainable part of the base begins in `stage` (None: frozen base)."""
        return None if stage == "head" else self.unfreeze_start

    def optimizer(self, stage: str, lr: float | None = None) -> torch.optim.Optimizer:
        """Set which parameters train in `stage` and return a fresh optimiser over them."""
        lr = self.config.stage_lr(stage) if lr is None else lr
        return make_optimizer(self.net, self.config, self.stage_start(stage), lr)

    def scheduler(self, optimizer: torch.optim.Optimizer, stage: str, epochs: int):
        """The learning-rate schedule of `stage`, stepped after every batch."""
        return make_scheduler(optimizer, self.config, len(self.data.train_batches), epochs)

    def set_modes(self, stage: str) -> None:
        self.net.set_modes(self.stage_start(stage), self.config.bn)

    # ---- the loop -----------------------------------------------------------------------
    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, stage: str
    ) -> tuple[float, int]:
        """One optimiser step on a batch; returns (loss, number correct)."""
        x, y = self._to_device(x, y)
        with autocast(self.device, self.config.precision):
            logits = self.net(x, frozen_base=stage == "head")
        loss = classification_loss(logits, y, self.class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item(), int((_predicted(logits) == y).sum())

    def train_epoch(
        self, optimizer, scheduler, stage: str, epoch: int, title: str | None = None
    ) -> dict[str, float]:
        """One seeded epoch: data order, augmentation and dropout depend only on the seed and
        `epoch` (the run's count). `title` names it on the progress bar. Returns mean training
        loss, accuracy, seconds and images per second."""
        self.set_modes(stage)
        total, correct, n = 0.0, 0, 0
        started = time.perf_counter()
        bar = tqdm(
            total=len(self.data.train_batches),
            disable=self.quiet,
            leave=False,
            unit="batch",
            desc=title or f"epoch {epoch} ({stage})",
            file=sys.stderr,
        )
        with _seeded(self.device, mix_seed(self.config.seed, epoch, 2)):
            for x, y in self.training_batches(epoch):
                loss, right = self.train_step(x, y, optimizer, stage)
                scheduler.step()
                total += loss * len(y)
                correct += right
                n += len(y)
                bar.update()
        bar.close()
        seconds = time.perf_counter() - started
        return {
            "train_loss": total / max(1, n),
            "train_accuracy": correct / max(1, n),
            "seconds": seconds,
            "images_per_second": n / seconds if seconds else 0.0,
        }

    @torch.inference_mode()
    def predict(self, which: str = "validation") -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) for the validation (or test) images in eval mode."""
        self.net.eval()
        probs, labels = [], []
        for x, y in self.data.batches(which):
            x, y = self._to_device(x, y)
            with autocast(self.device, self.config.precision):
                logits = self.net(x)
            probs.append(probabilities(logits).cpu())
            labels.append(y.cpu())
        if not probs:
            raise UsageError(f"no {which} image could be read.")
        return torch.cat(probs).numpy(), torch.cat(labels).numpy()

    def evaluate(self) -> dict[str, float]:
        """Validation loss (unweighted cross-entropy) and accuracy."""
        p, y = self.predict()
        picked = np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)
        return {
            "val_loss": float(-np.log(picked).mean()),
            "val_accuracy": float((p.argmax(1) == y).mean()),
        }

    def close(self) -> None:
        self.data.close()


def _predicted(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's global generators (dropout, drop-path) inside, restore them after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
