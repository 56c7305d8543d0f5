"""What every inference engine shares: the ready-to-call `Engine`, int8's `Calibration`, the
key that names a cached conversion, and the casts between a batch and a network.

A tap is any `nn.Module` whose forward takes a float NCHW batch and returns {module path:
tensor}, already pooled (featx's `LayerTap`); an engine wraps one.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from featx.errors import first_line

__all__ = [
    "CALIBRATION_IMAGES",
    "CONVERSIONS",
    "ENGINE_VERSION",
    "INT8_COSINE",
    "Calibration",
    "Engine",
    "cache_key",
    "digest",
]

ENGINE_VERSION = "2"  # part of every cache key: bump when a conversion changes
CALIBRATION_IMAGES = 300  # int8 calibration set: NNCF's default subset size
INT8_COSINE = 0.99  # int8 features below this cosine to fp32 get a warning

# How many conversions/compilations actually ran in this process, per engine; the cache tests
# read it to see that a second build reused the cached model.
CONVERSIONS: Counter[str] = Counter()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Run = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class Engine:
    """A ready-to-call inference engine: `engine(batch) -> {module path: float32 tensor}`."""

    name: str
    precision: str
    device: torch.device
    run: Run
    setup_seconds: float = 0.0  # conversion + compilation (or cache load) at construction
    fallback_reason: str | None = None  # set when the requested engine could not be built
    details: str = ""
    # int8: its features' cosine to fp32 on the calibration images (cosine_min, cosine_median)
    quality: dict[str, float] | None = None
    choice: str = ""  # how `auto` chose it, when it did

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run(batch)

    def describe(self) -> str:
        text = f"{self.name} {self.precision} on {self.device.type}"
        if self.details:
            text += f" ({self.details})"
        if self.setup_seconds >= 0.05:
            text += f", setup {self.setup_seconds:.1f}s"
        if self.fallback_reason:
            text += f"; fell back to eager: {self.fallback_reason}"
        return text


@dataclass(frozen=True)
class Calibration:
    """The images int8 quantization calibrates on.

    `batches()` yields preprocessed float NCHW batches of the dataset's images (called only when
    a quantization runs, so a cached conversion never decodes them); `identity` names them (the
    dataset, the preprocessing, the seeded choice) and is part of the int8 cache key."""

    batches: Callable[[], Iterable[torch.Tensor]]
    n_images: int
    seed: int
    identity: str

    def key(self) -> str:
        return f"calibration={self.identity}"


def cache_key(
    backbone: str,
    weights_sha256: str,
    layers: list[str],
    pool: str,
    input_size: int,
    precision: str,
    engine: str,
    calibration: str = "",
) -> str:
    """The string that identifies one conversion; callers may build their own. `calibration`
    (`Calibration.key()`) names an int8 conversion's calibration images."""
    return "|".join(
        [
            backbone,
            weights_sha256,
            ",".join(layers),
            pool,
            str(input_size),
            precision,
            engine,
            f"v{ENGINE_VERSION}",
            f"torch{torch.__version__}",
            *([calibration] if calibration else []),
        ]
    )


def digest(key: str) -> str:
    """The file name a cached conversion is stored under."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def one_line(error: BaseException) -> str:
    if not str(error).strip():
        return type(error).__name__
    return f"{type(error).__name__}: {first_line(error)}"


def cast(tap: nn.Module, precision: str) -> nn.Module:
    """The tap in `precision`; a copy unless fp32, so the caller's tap stays as it was."""
    if precision == "fp32":
        return tap
    return copy.deepcopy(tap).to(DTYPES[precision])


def as_input(batch: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = batch.to(device, dtype, non_blocking=True)
    return x if device.type == "mps" else x.contiguous(memory_format=torch.channels_last)


def to_float(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in outputs.items()}
