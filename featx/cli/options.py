"""Option groups of the augmentation settings and of the network and data options of
`finetune` and `lr-find`; each command gets the group's values as one argument."""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featx.cli.declare import (
    FRACTION,
    IMAGE_SIZE,
    NOT_NEGATIVE,
    POSITIVE,
    SEED,
    Shared,
    in_range,
    option_group,
    partial_settings,
    plain_option,
    regular_file,
    settings_parameters,
)
from featx.settings import AUGMENTATION, NETWORK, TRAINING, check_settings

__all__ = [
    "AUGMENT_DEFAULTS",
    "FINETUNE_AUGMENT_DEFAULTS",
    "AugmentFlags",
    "with_augmentation",
    "with_finetune_augmentation",
    "with_network",
]

# AugmentConfig's defaults and finetune's (featx.data.augment imports torch; --help must not);
# tests/test_cli_help.py holds them equal to the library's.
AUGMENT_DEFAULTS = {
    "rotation": 40.0,
    "shift": 0.2,
    "shear": 0.2,
    "zoom": 0.2,
    "hflip": True,
    "vflip": False,
    "crop": 0.0,
    "contrast": 0.0,
    "brightness": 0.0,
    "noise": 0.0,
    "downsample": 0.0,
    "fill": "nearest",
    "fill_value": 0,
}
FINETUNE_AUGMENT_DEFAULTS = {**AUGMENT_DEFAULTS, "rotation": 0.0, "shift": 0.1, "shear": 0.0}
FINETUNE_AUGMENT_DEFAULTS["zoom"] = 0.1

_AUGMENT_HELP = {
    "rotation": (float, "Rotation range in degrees, uniform in [-R, R].", in_range(0)),
    "shift": (float, "Shift range, as fractions of width and height.", in_range(0)),
    "shear": (float, "Shear factor range (0.2: about 11 degrees).", in_range(0)),
    "zoom": (float, "Zoom range: scale uniform in [1-Z, 1+Z].", in_range(0)),
    "hflip": (bool, "Mirror left-right half of the time.", None),
    "vflip": (bool, "Mirror top-bottom half of the time.", None),
    "crop": (
        float,
        "Cut a random fraction up to C off each side, then resize back.",
        in_range(0),
    ),  # fmt: skip
    "contrast": (float, "Contrast factor range [1-C, 1+C].", in_range(0)),
    "brightness": (float, "Per-channel brightness factor range [1-B, 1+B].", in_range(0)),
    "noise": (float, "Gaussian noise std on the 0-1 intensity scale.", in_range(0)),
    "downsample": (
        float,
        "Shrink by a random factor in [1, 1+D], then resize back.",
        in_range(0),
    ),  # fmt: skip
    "fill": (str, "Fill for uncovered pixels: nearest, constant or reflect.", None),
    "fill_value": (int, "Grey level 0-255 for --fill constant.", None),
}


def augmentation_options(defaults: dict[str, Any]) -> list[inspect.Parameter]:
    """The augmentation flags, each showing the default of the command's base settings; a
    flag not given keeps the settings file's (or that default) value."""
    options = [
        plain_option(
            "augment_config",
            Path | None,
            None,
            "TOML, JSON or YAML file of augmentation settings (keys as the flags below; "
            "flags override it).",
            panel=AUGMENTATION,
            callback=regular_file,
            metavar="FILE",
        )
    ]
    for name, (kind, help, check) in _AUGMENT_HELP.items():
        flag = name.replace("_", "-")
        decls = (f"--{flag}/--no-{flag}",) if kind is bool else ()
        value = defaults[name]
        shown = (
            ("on" if value else "off")
            if kind is bool
            else f"{value:g}"
            if kind is float
            else str(value)
        )
        options.append(
            plain_option(
                name,
                kind | None,
                None,
                f"{help} Default: {shown}.",
                *decls,
                panel=AUGMENTATION,
                callback=check,
                show_default=False,
            )  # fmt: skip
        )
    return options


@dataclass(frozen=True)
class AugmentFlags:
    """The augmentation options as given: a settings file and the flags that were set."""

    file: Path | None
    overrides: dict[str, Any]

    @property
    def given(self) -> bool:
        return self.file is not None or any(v is not None for v in self.overrides.values())

    def config(self, default: bool = False, base=None):
        """The AugmentConfig of the file (or `base`, or the defaults) with the flags applied;
        None when nothing was given, unless `default`. Raises UsageError for bad settings."""
        if not self.given and not default:
            return None
        from featx.data.augment import AugmentConfig

        if self.file is not None:
            base = AugmentConfig.from_file(self.file)
        elif base is None:
            base = AugmentConfig()
        given = {k: v for k, v in self.overrides.items() if v is not None}
        return AugmentConfig.from_dict({**base.to_dict(), **given})


def _augment_flags(values: dict[str, Any]) -> AugmentFlags:
    return AugmentFlags(values.pop("augment_config"), values)


with_augmentation = option_group(
    "augmentation", augmentation_options(AUGMENT_DEFAULTS), _augment_flags
)
"""Adds --augment-config FILE, --rotation ... --fill-value; the command gets `augmentation:
AugmentFlags`."""

with_finetune_augmentation = option_group(
    "augmentation", augmentation_options(FINETUNE_AUGMENT_DEFAULTS), _augment_flags
)
"""The same flags, showing fine-tuning's defaults."""


NETWORK_OPTIONS = [
    plain_option(
        "backbone",
        str,
        inspect.Parameter.empty,
        "Backbone name (see `featx backbones`), or timm:NAME.",
        panel=None,
    ),
    plain_option(
        "weights",
        str,
        "default",
        "default, a named weights set, none (seeded random), or a .pth/.safetensors file.",
        panel=None,
    ),
    plain_option(
        "image_size",
        int | None,
        None,
        "Resize straight to N x N (Keras target_size) instead of the weights' resize and crop.",
        panel=NETWORK,
        callback=IMAGE_SIZE,
    ),
    plain_option(
        "decode",
        str | None,
        None,
        "reduced: decode large JPEGs at a reduced size (still 2x the resize or more), or full. "
        "Default: the --head model's or --store's decoding, else reduced.",
        panel=NETWORK,
    ),
    plain_option(
        "layer",
        str | None,
        None,
        "Feature layer the head sits on (default: the final feature map).",
        panel=NETWORK,
    ),
    plain_option(
        "pool",
        str | None,
        None,
        "avg, max, avgmax, or none (flatten): how the layer's map becomes a vector (default avg).",
        panel=NETWORK,
    ),
    plain_option(
        "head",
        str,
        "mlp",
        "mlp, linear, or a model file to start from: the best model of a `featx fit` sweep "
        "(`--model best.featx`; a logreg or mlp on one layer of this backbone's features) or a "
        "fine-tuned model.",
        panel=NETWORK,
    ),
    plain_option(
        "hidden",
        int,
        256,
        "Hidden units of the mlp head (0: none).",
        panel=NETWORK,
        callback=in_range(0, 65536),
    ),
    plain_option(
        "dropout",
        float,
        0.5,
        "Dropout before the head's last layer(s).",
        panel=NETWORK,
        callback=in_range(0, 1, below=True),
    ),
    plain_option(
        "unfreeze_from",
        str | None,
        None,
        "First layer that trains in the full stage (as `featx layers` names it); default: "
        "the whole base, each earlier block at --lr-mult times the next one's rate.",
        panel=NETWORK,
    ),
    plain_option(
        "lr_mult",
        float,
        0.7,
        "Each earlier block's learning rate is this times the next later one's.",
        panel=TRAINING,
        callback=POSITIVE,
    ),
    plain_option("optimizer", str, "adam", "adam, adamw, sgd or rmsprop.", panel=TRAINING),
    plain_option(
        "weight_decay", float, 0.0, "Weight decay.", panel=TRAINING, callback=NOT_NEGATIVE
    ),
    plain_option(
        "momentum",
        float,
        0.9,
        "Momentum (sgd; the peak of one-cycle's momentum cycle).",
        panel=TRAINING,
        callback=in_range(0, 1),
    ),
    plain_option(
        "bn",
        str,
        "frozen",
        "frozen: BatchNorm keeps its statistics (eval mode); train: it updates them.",
        panel=NETWORK,
    ),
    plain_option(
        "class_weights", str, "none", "none, or balanced (inverse class frequency).", panel=TRAINING
    ),
    plain_option(
        "val_fraction",
        float,
        0.2,
        "Share of training images held out (seeded, stratified) when there is no "
        "validation folder.",
        panel=TRAINING,
        callback=FRACTION,
    ),
    plain_option(
        "seed",
        int,
        0,
        "Seed of everything random: split, order, augmentation, head.",
        panel=TRAINING,
        callback=SEED,
    ),
    plain_option(
        "precision", str, "fp32", "fp32, bf16 (autocast, CPU or GPU) or fp16 (GPU).", panel=NETWORK
    ),
    plain_option(
        "augment",
        bool,
        True,
        "Augment training images (settings below).",
        "--augment/--no-augment",
        panel=TRAINING,
    ),
]

NETWORK_OPTIONS += settings_parameters(
    Shared, only=("batch_size", "workers", "device"), defaults={"batch_size": 32}
)


def _network(values: dict[str, Any]) -> dict[str, Any]:
    check_settings(
        partial_settings(Shared, {k: values[k] for k in ("batch_size", "workers", "device")})
    )
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}


with_network = option_group("network", NETWORK_OPTIONS, _network)
"""Adds the network and data options of finetune and lr-find; the command gets `network: dict`
(FinetuneConfig fields plus augment, workers and device)."""
