"""What decides a fine-tuning run: its options (`FinetuneConfig`) and what it produced
(`FinetuneResult`)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from featx.backbones.registry import POOLS
from featx.data.augment_config import AugmentConfig
from featx.data.preprocessing import DECODE_POLICIES
from featx.errors import UsageError
from featx.runtime import PRECISIONS
from featx.settings import NETWORK, TRAINING, check_settings, option, seed_option

__all__ = ["FinetuneConfig", "FinetuneResult"]

STAGES = ("head", "full")
Schedule = Literal["onecycle", "cosine-restarts", "constant"]
Optimizer = Literal["adam", "adamw", "sgd", "rmsprop"]
BatchNorm = Literal["frozen", "train"]
ClassWeights = Literal["none", "balanced"]
Refit = Literal["all", "train"]
Pool = Literal[POOLS]
Precision = Literal[PRECISIONS]
Decode = Literal[DECODE_POLICIES]
SCHEDULES, OPTIMIZERS = typing.get_args(Schedule), typing.get_args(Optimizer)
BN_MODES, CLASS_WEIGHTS = typing.get_args(BatchNorm), typing.get_args(ClassWeights)
HEAD_KINDS = ("mlp", "linear")
DEFAULT_EPOCHS_HEAD = 5
DEFAULT_EPOCHS_HEAD_FITTED = 1  # with --head MODEL the head is already trained
ONECYCLE_WARMUP = 0.25  # share of a one-cycle stage spent warming up
MAX_EPOCHS = 100_000
# Defaults measured on the Fashion-MNIST example (docs: design notes):
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
    or 1 with a fitted head. `patience` 0 turns early stopping off. `refit` "all" (default)
    retrains on train + validation for the epochs validation chose, as a probe is refit on all
    labelled rows; "train" keeps the network chosen on validation.

    Each field is one option of `featx finetune` (`featx.settings.option`: help, panel, range);
    every value is checked when the config is made.
    """

    backbone: str = option(
        dataclasses.MISSING, "Backbone name (see `featx backbones`), or timm:NAME.", common=True
    )
    weights: str = option(
        "default",
        "default, a named weights set, none (seeded random), or a .pth/.safetensors file.",
        common=True,
    )
    image_size: int | None = option(
        None,
        "Resize straight to N x N (Keras target_size) instead of the weights' resize and crop.",
        panel=NETWORK,
        minimum=16,
        maximum=8192,
    )
    layer: str | None = option(
        None, "Feature layer the head sits on (default: the final feature map).", panel=NETWORK
    )
    pool: Pool | None = option(
        None,
        "avg, max, avgmax, or none (flatten): how the layer's map becomes a vector (default avg).",
        panel=NETWORK,
    )
    head: str = option(
        "mlp",
        "mlp, linear, or a model file to start from: the best model of a `featx fit` sweep "
        "(`--model best.featx`; a logreg or mlp on one layer of this backbone's features) or a "
        "fine-tuned model.",
        panel=NETWORK,
    )
    hidden: int = option(
        256, "Hidden units of the mlp head (0: none).", panel=NETWORK, minimum=0, maximum=65536
    )
    dropout: float = option(
        0.5,
        "Dropout before the head's last layer(s).",
        panel=NETWORK,
        minimum=0,
        maximum=1,
        below=True,
    )
    unfreeze_from: str | None = option(
        None,
        "First layer that trains in the full stage (as `featx layers` names it); default: "
        "the whole base, each earlier block at --lr-mult times the next one's rate.",
        panel=NETWORK,
    )
    epochs_head: int | None = option(
        None,
        "Epochs of stage 1, base frozen (default 5; 1 with --head MODEL; with --store up to "
        "100 on the cached rows, 0 with --head MODEL).",
        panel=TRAINING,
        minimum=0,
        maximum=MAX_EPOCHS,
    )
    epochs: int = option(
        DEFAULT_EPOCHS,
        "Epochs of stage 2, unfrozen from --unfreeze-from.",
        panel=TRAINING,
        minimum=0,
        maximum=MAX_EPOCHS,
    )
    lr: float = option(
        DEFAULT_LR,
        "Learning rate of the head (peak, with onecycle).",
        panel=TRAINING,
        minimum=0,
        above=True,
    )
    lr_head: float | None = option(
        None,
        "Learning rate of the head in stage 1 (default --lr).",
        panel=TRAINING,
        minimum=0,
        above=True,
    )
    lr_mult: float = option(
        DEFAULT_LR_MULT,
        "Each earlier block's learning rate is this times the next later one's.",
        panel=TRAINING,
        minimum=0,
        maximum=1,
        above=True,
    )
    schedule: Schedule = option("onecycle", "Learning-rate schedule.", panel=TRAINING)
    optimizer: Optimizer = option("adam", "Optimiser.", panel=TRAINING)
    weight_decay: float = option(0.0, "Weight decay.", panel=TRAINING, minimum=0)
    momentum: float = option(
        0.9,
        "Momentum (sgd; the peak of one-cycle's momentum cycle).",
        panel=TRAINING,
        minimum=0,
        maximum=1,
        below=True,
    )
    bn: BatchNorm = option(
        "frozen",
        "frozen: BatchNorm keeps its statistics (eval mode); train: it updates them.",
        panel=NETWORK,
    )
    class_weights: ClassWeights = option(
        "none", "none, or balanced (inverse class frequency).", panel=TRAINING
    )
    refit: Refit = option(
        "all",
        "all: once validation has chosen the epochs of each stage, train again from the start "
        "on train + validation for those epochs (the model file is that network); train: keep "
        "the network chosen on validation, trained on the training images only.",
        panel=TRAINING,
    )
    patience: int = option(
        0,
        "Stop a stage after N epochs without a better validation loss (0: never; the best "
        "checkpoint is kept either way).",
        panel=TRAINING,
        minimum=0,
        maximum=MAX_EPOCHS,
    )
    batch_size: int = option(
        32, "Images per training step.", panel=TRAINING, minimum=1, maximum=65536
    )
    augment: AugmentConfig | None = field(default_factory=lambda: FINETUNE_AUGMENT)
    val_fraction: float = option(
        0.2,
        "Share of training images held out (seeded, stratified) when there is no "
        "validation folder.",
        panel=TRAINING,
        minimum=0,
        maximum=1,
        above=True,
        below=True,
    )
    seed: int = seed_option("Seed of everything random: split, order, augmentation, head.")
    precision: Precision = option(
        "fp32", "fp32, bf16 (autocast, CPU or GPU) or fp16 (GPU).", panel=NETWORK
    )
    decode: Decode | None = option(
        None,
        "reduced: decode large JPEGs at a reduced size (still 2x the resize or more), or full. "
        "Default: the --head model's or --store's decoding, else reduced.",
        panel=NETWORK,
    )

    def __post_init__(self) -> None:
        if self.pool == "flatten":  # the older name of "none" for a head on the whole map
            object.__setattr__(self, "pool", "none")
        check_settings(self)
        if self.bn == "train" and self.batch_size < 2:
            raise UsageError("--batch-size must be 2 or more with --bn train.")
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
    # --refit all: the epochs retrained on train + validation, the images they trained on and
    # the test score of the network validation chose; None when nothing was retrained
    refit: dict[str, Any] | None = None
