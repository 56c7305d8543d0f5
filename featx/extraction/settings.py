"""What `extract`, `predict` and `evaluate` on images are asked to do, each option declared
once as a field (default, help, range, panel; choices as enums). The command line derives its
options from these classes and the library functions take them."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featx.backbones.registry import POOLS, backbone_help
from featx.data.preprocessing import DECODE_POLICIES
from featx.errors import UsageError
from featx.inference.engines import EngineChoice, engine_help
from featx.runtime import INFERENCE_PRECISIONS
from featx.settings import (
    DATA,
    NETWORK,
    OUTPUT,
    SCALE_OUT,
    Device,
    batch_size_option,
    check_settings,
    device_option,
    option,
    seed_option,
    workers_option,
)

__all__ = [
    "Compression",
    "Decode",
    "ExtractSettings",
    "Pool",
    "Precision",
    "PredictSettings",
    "StoredDtype",
    "extract_settings",
    "settled",
]

Pool = enum.StrEnum("Pool", {name: name for name in POOLS})
Decode = enum.StrEnum("Decode", {name: name for name in DECODE_POLICIES})
Precision = enum.StrEnum("Precision", {name: name for name in INFERENCE_PRECISIONS})
StoredDtype = enum.StrEnum("StoredDtype", {name: name for name in ("float32", "float16")})
Compression = enum.StrEnum("Compression", {name: name for name in ("none", "lzf", "gzip")})

PRECISION_HELP = (
    "Compute precision: fp32, bf16 (bf16 weights; CPU or GPU), fp16 (GPU), int8 (OpenVINO "
    "post-training quantization on the CPU, calibrated on up to 300 training images chosen "
    "with --seed)."
)


def _engine_option() -> Any:
    return option(EngineChoice.auto, engine_help(), panel=NETWORK)


@dataclasses.dataclass(frozen=True)
class ExtractSettings:
    """How one extraction computes and stores features (see `featx.extract`)."""

    backbone: str | None = option(None, backbone_help(), common=True, metavar="NAME")
    layers: list[str] = option(
        [],
        "Layer to store; repeat for several (one pass). See `featx layers BACKBONE`.",
        flag="layer",
        common=True,
        metavar="NAME",
    )
    store: Path | None = option(
        None,
        "Store file (default: in stores/, named after the data, backbone, weights and image size).",
        panel=OUTPUT,
        default_text="stores/DATA-BACKBONE-WEIGHTS-SIZE.h5",
    )
    weights: str = option(
        "default",
        "default, a named weights set (IMAGENET1K_V1), none (seeded random), or a "
        ".pth/.safetensors file.",
        panel=NETWORK,
    )
    image_size: int | None = option(
        None,
        "Resize straight to N x N with no crop (Keras target_size) instead of the weights' "
        "resize and crop.",
        panel=NETWORK,
        minimum=16,
        maximum=8192,
    )
    pool: Pool = option(Pool.none, "Reduce spatial maps before storing.", panel=OUTPUT)
    dtype: StoredDtype = option(StoredDtype.float32, "Stored dtype.", panel=OUTPUT)
    compression: Compression = option(Compression.none, "HDF5 compression.", panel=OUTPUT)
    precision: Precision = option(Precision.fp32, PRECISION_HELP, panel=NETWORK)
    engine: EngineChoice = _engine_option()
    batch_size: int | None = batch_size_option()
    workers: int | None = workers_option()
    device: Device = device_option()
    decode: Decode | None = option(
        None,
        "reduced: decode large JPEGs at a reduced size (still 2x the resize or more; 3x "
        "faster on 1600x1200 photos), or full.",
        panel=DATA,
        default_text="an existing store's decoding, else reduced",
    )
    augment: int = option(
        0, "Also store K augmented views of each training image.", panel=DATA, minimum=0,
        maximum=1000,
    )  # fmt: skip
    seed: int = seed_option("Seed of the augmented views and of int8's calibration images.")
    overwrite: bool = option(False, "Replace a store that was made differently.", panel=OUTPUT)
    quiet: bool = option(False, "No progress bars or messages.", panel=OUTPUT)
    shard: str | None = option(
        None,
        "Compute only shard I/N (0-based) of the rows into STORE.shard-IofN.h5, or `slurm` "
        "for the array task's; join the shards with `featx merge`.",
        panel=SCALE_OUT,
        metavar="I/N",
    )
    # Set by the caller, not options: the augmentation's ranges (a
    # `featx.data.augment.AugmentConfig`; None: the defaults) and the command recorded in the
    # store's history (None: this process's command line).
    augment_config: Any = None
    command: str | None = None


@dataclasses.dataclass(frozen=True)
class PredictSettings:
    """How `predict` and `evaluate` on images run a model's network over image files."""

    engine: EngineChoice = _engine_option()
    batch_size: int | None = batch_size_option()
    workers: int | None = workers_option(0)
    device: Device = device_option()
    tta: int = option(
        0,
        "Average the scores of each image and K augmented views of it (test-time "
        "augmentation, with the model's training augmentation). predict only.",
        minimum=0,
    )
    top_k: int = option(3, "Best classes listed per image. predict only.", minimum=1)
    quiet: bool = option(False, "No progress bars or messages.", panel=OUTPUT)


def extract_settings(
    settings: ExtractSettings | str | None,
    layers: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> ExtractSettings:
    """The settings of `extract(data, settings, **overrides)`, validated once; a str
    `settings` and `layers` are short for the backbone and layers fields."""
    overrides = dict(overrides or {})
    if isinstance(settings, str):
        settings, overrides["backbone"] = None, settings
    if layers is not None:
        overrides["layers"] = list(layers)
    s = settled(settings or ExtractSettings(), overrides)
    if not s.backbone:
        raise UsageError("give a backbone (--backbone NAME); `featx backbones` lists them.")
    if not s.layers:
        raise UsageError("give at least one --layer; `featx layers BACKBONE` lists them.")
    return s


def settled(settings: Any, overrides: dict[str, Any]) -> Any:
    """`settings` with `overrides` applied, validated once (`check_settings`), choices as their
    plain values."""
    settings = dataclasses.replace(settings, **overrides)
    check_settings(settings)
    plain = {
        f.name: getattr(settings, f.name).value
        for f in dataclasses.fields(settings)
        if isinstance(getattr(settings, f.name), enum.Enum)
    }
    return dataclasses.replace(settings, **plain)
