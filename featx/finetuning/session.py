"""Staged end-to-end fine-tuning on an image folder, with random augmentation throughout.

Stage 1 (`head`) trains only the new head: the base is frozen (no gradients, eval mode, its
weights bit-for-bit unchanged). Stage 2 (`full`) trains every layer from `--unfreeze-from` on
together with the head, with one learning rate per block (see `featx.finetuning.network`).

Every epoch ends with an atomic checkpoint (`last.pt`) holding the weights, optimiser,
scheduler, history and early-stopping state, so `--resume` continues a killed run. Each epoch is
a pure function of that state and the seed (data order, augmentation and dropout are seeded
per epoch), so a resumed run trains exactly as an uninterrupted one would.

Output folder: `config.json`, `last.pt`, `best.pt` (lowest validation loss), `history.json`,
`history.png`, `metrics.json` and `model.featx` (for `featx predict`/`featx evaluate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from featx.backbones.layers import POOLS, LayerInfo, resolve_layers, trace_layers
from featx.backbones.registry import Backbone, LoadedBackbone, Preprocessing, get_backbone
from featx.data.augment import AugmentConfig, Augmenter, view_seed
from featx.data.folders import (
    UNSPLIT,
    BadImage,
    ImageFile,
    ImageFolder,
    load_image,
    scan_image_folder,
)
from featx.errors import Interrupted, UsageError, check_choice
from featx.finetuning.network import (
    BN_MODES,
    Network,
    build_network,
)
from featx.models.heads import (
    FittedHead,
    classification_loss,
    load_fitted_head,
    probabilities,
)
from featx.runtime import (
    PRECISIONS,
    atomic_write,
    autocast,
    default_workers,
    library_versions,
    resolve_device,
    write_json,
)

STAGES = ("head", "full")
SCHEDULES = ("onecycle", "cosine-restarts", "constant")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
CLASS_WEIGHTS = ("none", "balanced")
HEAD_KINDS = ("mlp", "linear")
CHECKPOINT_FORMAT = "featx-finetune-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_EPOCHS_HEAD = 5
DEFAULT_EPOCHS_HEAD_FITTED = 1  # with --head MODEL the head is already trained
ONECYCLE_WARMUP = 0.25  # share of a one-cycle stage spent warming up
LAST, BEST = "last.pt", "best.pt"


# ---- configuration -----------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides what a fine-tuning run computes (not where or how fast).

    `layer` is the feature layer the head sits on (default: the final feature map) and `pool`
    how its map becomes a vector (default avg); a `head` model file brings its own.
    `lr` is the head's learning rate (in stage 1 too unless `lr_head` is given); in stage 2
    each earlier block gets `lr_mult` times the rate of the next later one. `head` is "mlp",
    "linear" or a model file written by `featx fit` whose last step is an MLP. `augment` is
    the augmentation applied to training images (None: none). `epochs_head` defaults to 5,
    or 1 with a fitted head. `patience` 0 turns early stopping off.
    """

    backbone: str
    weights: str = "default"
    image_size: int | None = None
    layer: str | None = None
    pool: str | None = None
    head: str = "mlp"
    hidden: int = 256
    dropout: float = 0.5
    unfreeze_from: str | None = None
    epochs_head: int | None = None
    epochs: int = 10
    lr: float = 1e-3
    lr_head: float | None = None
    lr_mult: float = 0.3
    schedule: str = "onecycle"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    bn: str = "frozen"
    class_weights: str = "none"
    patience: int = 5
    batch_size: int = 32
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    val_fraction: float = 0.2
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name, choices in (
            ("schedule", SCHEDULES),
            ("optimizer", OPTIMIZERS),
            ("bn", BN_MODES),
            ("class_weights", CLASS_WEIGHTS),
            ("precision", PRECISIONS),
        ):
            check_choice(name.replace("_", "-"), getattr(self, name), choices)
        if self.pool == "flatten":  # the older name of "none" for a head on the whole map
            object.__setattr__(self, "pool", "none")
        if self.pool is not None:
            check_choice("pool", self.pool, POOLS)
        checks = (
            ("epochs", self.epochs >= 0, "0 or more"),
            ("epochs-head", self.epochs_head is None or self.epochs_head >= 0, "0 or more"),
            ("lr", self.lr > 0, "positive"),
            ("lr-head", self.lr_head is None or self.lr_head > 0, "positive"),
            ("lr-mult", 0 < self.lr_mult <= 1, "in (0, 1]"),
            ("weight-decay", self.weight_decay >= 0, "0 or more"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("patience", self.patience >= 0, "0 (off) or more"),
            ("batch-size", self.batch_size >= 1, "at least 1"),
            (
                "batch-size",
                self.bn == "frozen" or self.batch_size >= 2,
                "2 or more with --bn train",
            ),
            ("hidden", self.hidden >= 0, "0 (no hidden layer) or more"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("val-fraction", 0 < self.val_fraction < 1, "in (0, 1)"),
            ("image-size", self.image_size is None or self.image_size >= 16, "at least 16"),
        )
        for flag, ok, what in checks:
            if not ok:
                raise UsageError(f"--{flag} must be {what}.")
        if self.head not in HEAD_KINDS and not Path(self.head).is_file():
            raise UsageError(
                f"--head must be mlp, linear or a model file from `featx fit`; "
                f"{self.head} does not exist."
            )

    @property
    def fitted_head(self) -> bool:
        return self.head not in HEAD_KINDS

    @property
    def stage_epochs(self) -> dict[str, int]:
        head = self.epochs_head
        if head is None:
            head = DEFAULT_EPOCHS_HEAD_FITTED if self.fitted_head else DEFAULT_EPOCHS_HEAD
        return {"head": head, "full": self.epochs}

    def stage_lr(self, stage: str) -> float:
        return self.lr_head if stage == "head" and self.lr_head is not None else self.lr

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["augment"] = self.augment.to_dict() if self.augment is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        data = dict(data)
        if data.get("augment") is not None:
            data["augment"] = AugmentConfig.from_dict(data["augment"])
        return cls(**data)


@dataclass
class FinetuneResult:
    """What a run produced."""

    out: Path
    history: list[dict[str, Any]]
    best_epoch: int
    metrics: dict[str, Any]
    model: Path
    resumed_from: int = 0  # epochs already done when the run started
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ---- data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Indices into `folder.files` of the training and validation images, and their origin."""

    train: tuple[int, ...]
    validation: tuple[int, ...]
    how: str


def training_split(folder: ImageFolder, val_fraction: float, seed: int) -> Split:
    """Train/validation from the folder's splits; without a validation folder, a seeded,
    stratified `val_fraction` of the training (or unsplit) images is held out."""
    by_split: dict[str, list[int]] = {}
    for i, f in enumerate(folder.files):
        by_split.setdefault(f.split, []).append(i)
    pool = by_split.get("train") or by_split.get(UNSPLIT)
    if not pool:
        raise UsageError(
            f"{folder.root} has no training images; expected DATA/train/CLASS/ or DATA/CLASS/."
        )
    if by_split.get("validation"):
        return Split(tuple(pool), tuple(by_split["validation"]), "validation folder")
    rng = np.random.default_rng(seed)
    labels = np.array([folder.files[i].label for i in pool])
    pool_arr = np.array(pool)
    held: list[int] = []
    for label in np.unique(labels):
        members = pool_arr[labels == label]
        if len(members) < 2:
            continue
        n = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        held.extend(rng.permutation(members)[:n].tolist())
    if not held:
        raise UsageError(
            f"{folder.root} has too few images to hold out a validation split; "
            "add images or a validation/ folder."
        )
    held_set = set(held)
    train = tuple(i for i in pool if i not in held_set)
    how = f"seeded stratified split: {val_fraction:g} of the training images, seed {seed}"
    return Split(train, tuple(sorted(held)), how)


@dataclass(frozen=True)
class ImageTransform:
    """Image -> input tensor through the backbone's preprocessing; with a seed, augmented at
    the network's input size."""

    preprocessing: Preprocessing
    augment: AugmentConfig | None = None

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        if seed is None or self.augment is None:
            return self.preprocessing(image)
        augmenter = Augmenter(self.augment)
        return self.preprocessing(image, lambda im: augmenter(im, seed))


class _Images(Dataset):
    """Items are (position, epoch): epoch None gives the plain image, else an augmented view
    seeded by (seed, file index, epoch). Unreadable files yield their reason."""

    def __init__(
        self,
        root: Path,
        files: Sequence[ImageFile],
        index: Sequence[int],
        transform: ImageTransform,
        seed: int,
    ):
        self.root, self.files, self.index = root, files, list(index)
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int | None]):
        position, epoch = item
        file_index = self.index[position]
        f = self.files[file_index]
        try:
            image = load_image(self.root / f.path)
        except BadImage as bad:
            return position, None, f.label, f"{f.path}: {bad}"
        seed = None if epoch is None else view_seed(self.seed, file_index, epoch)
        return position, self.transform(image, seed), f.label, None


def _collate(samples):
    good = [s for s in samples if s[1] is not None]
    bad = [s[3] for s in samples if s[1] is None]
    if not good:
        return [], None, None, bad
    positions = [s[0] for s in good]
    x = torch.stack([s[1] for s in good])
    y = torch.tensor([s[2] for s in good], dtype=torch.long)
    return positions, x, y, bad


class _EpochBatches:
    """Shuffled batches of (position, epoch) for `epoch`, seeded by (seed, epoch); a final
    batch of one image is dropped when BatchNorm trains (it cannot normalise one sample)."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_single: bool):
        self.n, self.batch_size, self.seed, self.drop_single = n, batch_size, seed, drop_single
        self.epoch = 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 1))
        order = torch.randperm(self.n, generator=g).tolist()
        for start in range(0, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) == 1 and self.drop_single and self.n > 1:
                return
            yield [(p, self.epoch) for p in batch]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not (rest == 1 and self.drop_single and self.n > 1) else 0)


class _InOrder:
    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def __iter__(self):
        for start in range(0, self.n, self.batch_size):
            yield [(p, None) for p in range(start, min(self.n, start + self.batch_size))]

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers."""
    return int(
        np.random.SeedSequence([p & (2**63 - 1) for p in parts]).generate_state(2, np.uint64)[0]
    ) & (2**63 - 1)


# ---- the session: network, data and device -----------------------------------------------
class Session:
    """A network on its device with its training and validation data: what both fine-tuning
    and the learning-rate finder work on."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        config: FinetuneConfig,
        *,
        workers: int | None = None,
        device: str = "auto",
        quiet: bool = False,
        fitted: FittedHead | None = None,
    ):
        self.config = config
        self.quiet = quiet
        self.device = resolve_device(device)
        autocast(self.device, config.precision)  # refuses fp16 on a CPU before any work
        self.folder = scan_image_folder(data_dir)
        self.class_names = list(self.folder.class_names)
        if len(self.class_names) < 2:
            raise UsageError(f"{self.folder.root} has one class; fine-tuning needs at least two.")
        self.split = training_split(self.folder, config.val_fraction, config.seed)
        self.record: Backbone = get_backbone(config.backbone)
        if fitted is None and config.fitted_head:
            fitted = load_fitted_head(config.head)
        preprocessing = self.record.default_preprocessing(config.weights)
        if config.image_size:
            preprocessing = preprocessing.with_image_size(config.image_size)
        self.loaded: LoadedBackbone = self.record.load(config.weights)
        layer, pool = config.layer, config.pool or "avg"
        if fitted is not None:
            fitted.check(self.loaded, preprocessing, self.class_names)
            layer, pool = fitted.layer_module, fitted.pool
            wanted = config.layer and self.record.module_path(config.layer)
            if (wanted and wanted != layer) or (config.pool and config.pool != pool):
                raise UsageError(
                    f"--head {config.head} sits on layer {fitted.layer_module} with {pool} "
                    "pooling; leave out --layer and --pool, or give those."
                )
        self.preprocessing = preprocessing
        hidden = [config.hidden] if config.hidden and config.head == "mlp" else []
        infos = trace_layers(self.record, self.loaded.model, preprocessing.input_size)
        self.net, self.layer_info = build_network(
            self.record,
            self.loaded.model,
            preprocessing.input_size,
            len(self.class_names),
            layer=layer,
            pool=pool,
            hidden_sizes=hidden,
            dropout=config.dropout,
            head=fitted.head if fitted is not None else None,
            seed=config.seed,
            infos=infos,
        )
        self.unfreeze_start = self._unfreeze_start(infos)
        self.unfreeze_from = self.net.unfreeze_layer_name(self.record, self.unfreeze_start)
        self.net.to(self.device)
        if self.device.type != "mps":
            self.net.to(memory_format=torch.channels_last)
        self.class_weights = self._class_weights()
        self.workers = default_workers() if workers is None else workers
        transform = ImageTransform(preprocessing, config.augment)
        root, files = self.folder.root, self.folder.files
        self.train_images = _Images(root, files, self.split.train, transform, config.seed)
        self.val_images = _Images(root, files, self.split.validation, transform, config.seed)
        self.train_batches = _EpochBatches(
            len(self.train_images), config.batch_size, config.seed, config.bn == "train"
        )
        self._loaders: dict[str, DataLoader] = {}
        self.skipped: dict[str, str] = {}

    def _unfreeze_start(self, infos: list[LayerInfo]) -> int:
        if self.config.unfreeze_from is None:
            return self.net.default_unfreeze_start()
        info = resolve_layers(self.record, infos, [self.config.unfreeze_from])[0]
        return self.net.start_of(self.record, info)

    # ---- loaders ------------------------------------------------------------------------
    def loader(self, which: str) -> DataLoader:
        if which not in self._loaders:
            dataset = self.train_images if which == "train" else self.val_images
            sampler = (
                self.train_batches
                if which == "train"
                else _InOrder(len(dataset), self.config.batch_size)
            )
            self._loaders[which] = DataLoader(
                dataset,
                batch_sampler=sampler,
                num_workers=self.workers,
                collate_fn=_collate,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0,
                prefetch_factor=2 if self.workers else None,
            )
        return self._loaders[which]

    def _class_weights(self) -> torch.Tensor | None:
        if self.config.class_weights == "none":
            return None
        labels = np.array([self.folder.files[i].label for i in self.split.train])
        counts = np.bincount(labels, minlength=len(self.class_names)).astype(np.float64)
        weights = np.divide(
            len(labels),
            len(self.class_names) * counts,
            out=np.zeros_like(counts),
            where=counts > 0,
        )
        return torch.tensor(weights, dtype=torch.float32, device=self.device)

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
        c = self.config
        start = self.stage_start(stage)
        self.net.set_trainable(start)
        groups = self.net.param_groups(
            start, c.stage_lr(stage) if lr is None else lr, c.lr_mult, c.weight_decay
        )
        if c.optimizer == "sgd":
            return torch.optim.SGD(
                groups, lr=groups[-1]["lr"], momentum=c.momentum, nesterov=c.momentum > 0
            )
        if c.optimizer == "rmsprop":
            return torch.optim.RMSprop(groups, lr=groups[-1]["lr"], momentum=0.0)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=groups[-1]["lr"])
        return torch.optim.Adam(groups, lr=groups[-1]["lr"])

    def scheduler(self, optimizer: torch.optim.Optimizer, stage: str, epochs: int):
        """The learning-rate schedule of `stage`, stepped after every batch."""
        c = self.config
        steps = max(1, len(self.train_batches))
        total = epochs * steps
        if c.schedule == "onecycle" and total >= 3:  # torch's one-cycle needs 3 steps or more
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in optimizer.param_groups],
                total_steps=total,
                pct_start=max(ONECYCLE_WARMUP, 2 / total),  # at least 2 warm-up steps
                anneal_strategy="cos",
                cycle_momentum=c.optimizer in ("sgd", "adam", "adamw") and c.momentum > 0,
                base_momentum=min(0.85, c.momentum),
                max_momentum=c.momentum,
            )
        if c.schedule == "cosine-restarts" and total >= 2:
            return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                optimizer, T_0=steps, T_mult=2
            )
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)

    def set_modes(self, stage: str) -> None:
        self.net.set_modes(self.stage_start(stage), self.config.bn)

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

    def training_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The (x, y) batches of one training epoch; unreadable files are skipped."""
        self.train_batches.epoch = epoch
        for _positions, x, y, bad in self.loader("train"):
            self._note_bad(bad)
            if x is not None:
                yield x, y

    def _note_bad(self, bad: list[str]) -> None:
        for text in bad:
            path, _, reason = text.partition(": ")
            self.skipped.setdefault(path, reason)

    def train_epoch(self, optimizer, scheduler, stage: str, epoch: int) -> dict[str, float]:
        """One seeded epoch: data order, augmentation and dropout depend only on the seed and
        `epoch`. Returns mean training loss, accuracy, seconds and images per second."""
        self.set_modes(stage)
        total, correct, n = 0.0, 0, 0
        started = time.perf_counter()
        bar = tqdm(
            total=len(self.train_batches),
            disable=self.quiet,
            leave=False,
            unit="batch",
            desc=f"epoch {epoch} ({stage})",
            file=sys.stderr,
        )
        with _seeded(self.device, _mix(self.config.seed, epoch, 2)):
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
    def predict(self) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) for the validation images in eval mode."""
        self.net.eval()
        probs, labels = [], []
        for _positions, x, y, bad in self.loader("validation"):
            self._note_bad(bad)
            if x is None:
                continue
            x, y = self._to_device(x, y)
            with autocast(self.device, self.config.precision):
                logits = self.net(x)
            probs.append(probabilities(logits).cpu())
            labels.append(y.cpu())
        if not probs:
            raise UsageError("no validation image could be read.")
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
        self._loaders.clear()


def _predicted(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's global generators (dropout, drop-path) inside, restore them after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---- checkpoints -------------------------------------------------------------------------
def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and a rename: a crash never leaves half a file."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by fine-tuning (tensors and plain data only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"cannot read checkpoint {path} ({type(error).__name__}).") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a featx fine-tuning checkpoint.")
    return state


RUN_FILES = (
    "config.json",
    LAST,
    BEST,
    "history.json",
    "history.png",
    "metrics.json",
    "model.featx",
    "base.safetensors",
)


def default_run_dir(data_dir: str | os.PathLike, backbone: str) -> Path:
    """runs/<data folder>-<backbone>."""
    slug = "".join(
        c if c.isalnum() or c in "_.-" else "-"
        for c in f"{Path(data_dir).resolve().name}-{backbone}"
    )
    return Path("runs") / slug.strip("-")


# ---- the run -----------------------------------------------------------------------------
def finetune(
    data_dir: str | os.PathLike,
    config: FinetuneConfig,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    device: str = "auto",
    quiet: bool = False,
    command: str | None = None,
    trust_pickle: bool = False,
) -> FinetuneResult:
    """Fine-tune `config.backbone` on the image folder `data_dir`, writing the run to `out`
    (default runs/<data>-<backbone>). `resume` continues from `out/last.pt`. A `--head` model
    file that is a legacy pickle is loaded only with `trust_pickle`."""
    out = Path(out) if out is not None else default_run_dir(data_dir, config.backbone)
    log = (lambda *_: None) if quiet else (lambda text: print(text, file=sys.stderr))
    # The head model is read before the run folder is touched: a refused file leaves no run.
    fitted = (
        load_fitted_head(config.head, trust_pickle=trust_pickle) if config.fitted_head else None
    )
    state = _start(out, config, resume, overwrite)
    session = Session(data_dir, config, workers=workers, device=device, quiet=quiet, fitted=fitted)
    try:
        return _run(session, out, state, log, command or " ".join(sys.argv))
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted; add --resume to the same command to continue from the last "
            "finished epoch."
        ) from None
    finally:
        session.close()


def _start(out: Path, config: FinetuneConfig, resume: bool, overwrite: bool) -> dict | None:
    """The checkpoint to resume from (None for a new run), after checking the folder."""
    last = out / LAST
    if resume:
        if not last.is_file():
            raise UsageError(
                f"cannot resume: {out} has no checkpoint {LAST}; run without --resume to start."
            )
        state = load_checkpoint(last)
        differences = [
            f"--{k.replace('_', '-')} was {state['config'].get(k)!r}, now {v!r}"
            for k, v in config.to_dict().items()
            if state["config"].get(k) != v
        ]
        if differences:
            raise UsageError(
                f"run {out} was started with other options ({'; '.join(differences)}); resume "
                "with the same options, or start a new run with another --out."
            )
        return state
    if any((out / name).exists() for name in RUN_FILES):
        if not overwrite:
            raise UsageError(
                f"{out} already holds a fine-tuning run; add --resume to continue it, "
                "--overwrite to start again, or choose another --out."
            )
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return None


def _run(session: Session, out: Path, state: dict | None, log, command: str) -> FinetuneResult:
    config, net = session.config, session.net
    out.mkdir(parents=True, exist_ok=True)
    if state is not None and state["dataset_fingerprint"] != session.folder.fingerprint:
        raise UsageError(
            f"the images in {session.folder.root} changed since run {out} started; "
            "start a new run (--overwrite or another --out)."
        )
    plan = config.stage_epochs
    write_json(out / "config.json", _describe(session, command, plan))
    history: list[dict[str, Any]] = list(state["history"]) if state else []
    best = dict(state["best"]) if state else {"val_loss": math.inf, "epoch": 0}
    position = (STAGES.index(state["stage"]), state["stage_done"]) if state else (0, False)
    resumed_from = len(history)
    if state is not None:
        net.load_state_dict(state["network"])
        log(f"Resuming {out} after epoch {resumed_from}.")
    for index, stage in enumerate(STAGES):
        n = plan[stage]
        here = state is not None and index == position[0]
        if n == 0 or index < position[0] or (here and position[1]):
            continue
        if stage == "full" and not here and (out / BEST).is_file():
            net.load_state_dict(load_checkpoint(out / BEST)["network"])  # best of stage 1
        optimizer = session.optimizer(stage)
        scheduler = session.scheduler(optimizer, stage, n)
        first, bad = 0, 0
        if here:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            first, bad = state["stage_epoch"], state["bad_epochs"]
        for epoch in range(first, n):
            number = len(history) + 1
            entry = {"epoch": number, "stage": stage, "stage_epoch": epoch + 1}
            entry |= session.train_epoch(optimizer, scheduler, stage, number)
            entry |= session.evaluate()
            entry["lr"] = {g["name"]: g["lr"] for g in optimizer.param_groups}
            history.append(entry)
            if entry["val_loss"] < best["val_loss"]:
                best = {"val_loss": entry["val_loss"], "epoch": number}
                save_atomic(_best_state(net, entry), out / BEST)
                bad = 0
            else:
                bad += 1
            stop = bool(config.patience) and bad >= config.patience
            save_atomic(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "config": config.to_dict(),
                    "dataset_fingerprint": session.folder.fingerprint,
                    "stage": stage,
                    "stage_epoch": epoch + 1,
                    "stage_done": stop or epoch + 1 == n,
                    "bad_epochs": bad,
                    "best": best,
                    "history": history,
                    "network": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
                out / LAST,
            )
            write_json(out / "history.json", history)
            log(_epoch_line(entry, sum(plan.values())))
            if stop:
                log(f"Early stopping: no better validation loss for {bad} epochs.")
                break
    return _finish(session, out, history, best, resumed_from, log, command)


def _best_state(net: Network, entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "network": net.state_dict(),
        "epoch": entry["epoch"],
        "val_loss": entry["val_loss"],
        "val_accuracy": entry["val_accuracy"],
    }


def _epoch_line(entry: dict[str, Any], total: int) -> str:
    return (
        f"epoch {entry['epoch']}/{total} ({entry['stage']}): loss {entry['train_loss']:.4f} "
        f"acc {entry['train_accuracy']:.4f} | val loss {entry['val_loss']:.4f} "
        f"acc {entry['val_accuracy']:.4f} | {entry['seconds']:.1f} s, "
        f"{entry['images_per_second']:.1f} img/s"
    )


def _finish(session, out, history, best, resumed_from, log, command) -> FinetuneResult:
    """Best weights back in, validation metrics, the model file and the history plot."""
    from featx.classify.metrics import classification_metrics
    from featx.finetuning.export import export_model

    if (out / BEST).is_file():
        session.net.load_state_dict(load_checkpoint(out / BEST)["network"])
    p, y = session.predict()
    classes = np.arange(len(session.class_names))
    metrics = {
        "validation": classification_metrics(y, p.argmax(axis=1), session.class_names, p, classes)
    }
    write_json(out / "metrics.json", metrics)
    write_json(out / "history.json", history)
    model = export_model(session, out, metrics, history, best, command)
    from featx.finetuning.plots import plot_history

    plot_history(history, out / "history.png", title=f"{session.config.backbone} fine-tuning")
    skipped = sorted(session.skipped.items())
    log(
        f"Best epoch {best['epoch']}: validation accuracy "
        f"{metrics['validation']['accuracy']:.4f}. Wrote {out}."
    )
    return FinetuneResult(out, history, best["epoch"], metrics, model, resumed_from, skipped)


def _describe(session: Session, command: str, plan: dict[str, int]) -> dict[str, Any]:
    """config.json: the options and everything they resolved to."""
    c, net, folder, split = session.config, session.net, session.folder, session.split
    groups = {
        stage: {
            g["name"]: g["lr"]
            for g in net.param_groups(session.stage_start(stage), c.stage_lr(stage), c.lr_mult, 0)
        }
        for stage in STAGES
    }
    return {
        "config": c.to_dict(),
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": {
            "root": str(folder.root.resolve()),
            "fingerprint": folder.fingerprint,
            "class_names": session.class_names,
            "n_train": len(split.train),
            "n_validation": len(split.validation),
            "validation": split.how,
        },
        "backbone": {
            "name": session.loaded.name,
            "weights": session.loaded.weights,
            "weights_sha256": session.loaded.weights_sha256,
            "preprocessing": session.preprocessing.to_dict(),
            "preprocessing_text": session.preprocessing.describe(),
        },
        "network": {
            "layer": session.layer_info.name,
            "module": session.layer_info.module,
            "layer_shape": list(session.layer_info.shape),
            "pool": net.pool,
            "head": str(net.head),
            "blocks": [b.name for b in net.blocks],
            "unfreeze_from": session.unfreeze_from,
        },
        "stage_epochs": plan,
        "learning_rates": groups,
        "device": str(session.device),
        "workers": session.workers,
        "versions": library_versions(),
    }
