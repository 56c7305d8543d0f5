"""What decides a fine-tuning run: its options (`FinetuneConfig`) and what it produced
(`FinetuneResult`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featx.backbones.registry import POOLS
from featx.data.augment import AugmentConfig
from featx.data.preprocessing import DECODE_POLICIES
from featx.errors import UsageError, check_choice
from featx.finetuning.network import BN_MODES
from featx.runtime import (
    PRECISIONS,
)

__all__ = ["FinetuneConfig", "FinetuneResult"]

STAGES = ("head", "full")
SCHEDULES = ("onecycle", "cosine-restarts", "constant")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
CLASS_WEIGHTS = ("none", "balanced")
HEAD_KINDS = ("mlp", "linear")
DEFAULT_EPOCHS_HEAD = 5
DEFAULT_EPOCHS_HEAD_FITTED = 1  # with --head MODEL the head is already trained
ONECYCLE_WARMUP = 0.25  # share of a one-cycle stage spent warming up
# Defaults measured on the Fashion-MNIST example (README, "Choosing the fine-tuning defaults"):
# at 1e-3 the unfrozen run lost more validation loss than at 1e-4; unfreezing only the last
# blocks never beat the stage-1 head within 3-10 epochs, while the whole base at lr-mult 0.7
# did after 7-10 epochs (validation loss falls unevenly, so early stopping is off by default and
# the best checkpoint is kept); the Keras recipe's rotation and shear hurt most.
DEFAULT_LR = 1e-4
DEFAULT_EPOCHS = 15
DEFAULT_LR_MULT = 0.7
FINETUNE_AUGMENT = AugmentConfig(rotation=0.0, shear=0.0, shift=0.1, zoom=0.1)


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
    epochs: int = DEFAULT_EPOCHS
    lr: float = DEFAULT_LR
    lr_head: float | None = None
    lr_mult: float = DEFAULT_LR_MULT
    schedule: str = "onecycle"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    bn: str = "frozen"
    class_weights: str = "none"
    patience: int = 0
    batch_size: int = 32
    augment: AugmentConfig | None = field(default_factory=lambda: FINETUNE_AUGMENT)
    val_fraction: float = 0.2
    seed: int = 0
    precision: str = "fp32"
    decode: str | None = None  # "full" or "reduced"; None: a --head's or --store's, else reduced

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
        if self.decode is not None:
            check_choice("decode", self.decode, DECODE_POLICIES)
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
