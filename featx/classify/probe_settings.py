"""What `featx probe` is asked to do: each option declared once (default, help, range,
panel); the command line derives its options from `ProbeSettings` and `featx.probe` takes it.
Imports neither torch nor numpy, so `featx --help` stays fast."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from featx.settings import DATA, OUTPUT, TRAINING, Device, device_option, option, seed_option

__all__ = ["ClassWeight", "ProbeSettings", "Protocol", "SpatialPool"]


class Protocol(str, enum.Enum):
    """How a layer is probed."""

    linear = "linear"
    knn = "knn"
    ncm = "ncm"


class ClassWeight(str, enum.Enum):
    none = "none"
    balanced = "balanced"


class SpatialPool(str, enum.Enum):
    avg = "avg"
    max = "max"
    avgmax = "avgmax"


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """What one probe is asked to do (see `featx.probe`)."""

    layers: list[str] = option(
        [], "Stored layer to probe; repeat for several. Default: every stored layer.",
        flag="layer", common=True, metavar="KEY",
    )  # fmt: skip
    protocol: Protocol = option(
        Protocol.linear,
        "linear: L-BFGS logistic regression over C in logspace(-6, 5, 45); knn: cosine kNN, "
        "votes weighted by exp(cos/0.07), k in 10, 20, 100, 200; ncm: nearest class mean.",
        common=True,
    )
    shots: list[int] = option(
        [], "Few-shot: labelled images per class, e.g. 1,5,10 (drawn --tries times).",
        minimum=1, maximum=1_000_000, panel=TRAINING, metavar="K,...",
    )  # fmt: skip
    tries: int = option(5, "Few-shot draws for each K.", minimum=1, maximum=1000, panel=TRAINING)
    class_weight: ClassWeight = option(
        ClassWeight.none, "balanced weighs each class by n / (classes x its count).",
        panel=TRAINING,
    )  # fmt: skip
    pool: SpatialPool = option(
        SpatialPool.avg, "How a stored spatial map (C x H x W) becomes a vector.", panel=DATA
    )
    val_fraction: float = option(
        0.2, "Hold-out share of training images when the store has no validation split.",
        minimum=0, maximum=1, above=True, below=True, panel=DATA,
    )  # fmt: skip
    seed: int = seed_option("Seed of the hold-out and the few-shot draws.")
    max_iter: int = option(
        1000, "L-BFGS iterations per C at most.", minimum=1, maximum=1_000_000, panel=TRAINING
    )
    tol: float = option(
        1e-5, "Stop at C when the largest gradient entry is below this (as scikit-learn's tol).",
        minimum=0, maximum=1, above=True, panel=TRAINING,
    )  # fmt: skip
    device: Device = device_option()
    memory_budget: int | None = option(
        None, "Bytes of features held in memory per layer; a larger layer streams.",
        minimum=1, panel=DATA, default_text="half the available memory",
    )  # fmt: skip
    chunk_bytes: int | None = option(
        None, "Bytes of float32 rows read at a time when streaming.",
        minimum=1, panel=DATA, default_text="64 MB",
    )  # fmt: skip
    stream: bool | None = None  # True/False force streaming; None decides by memory_budget
    report: Path | None = option(None, "Write the JSON report here.", panel=OUTPUT)
    save_best: Path | None = option(
        None, "Write the best layer's probe as a featx model file (linear or knn).", panel=OUTPUT
    )
    log: bool = True  # record the probe in the store's run log
    command: str | None = None
