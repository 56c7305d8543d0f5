"""`--engine auto`: the engine chosen from speed-ups measured on known CPU classes, weighed
against each engine's setup and the length of the run. CPU classes and devices without
measurements run eager."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from featx.inference.engines import ENGINES

if TYPE_CHECKING:
    import torch

__all__ = ["MEASURED", "Measured", "choose_engine", "cpu_class", "resolve_engine"]


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU flags that decide low-precision speed (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_class(flags: frozenset[str] | None = None) -> str:
    """The row of MEASURED a CPU belongs to: amx, avx512_bf16, avx512 or avx2."""
    flags = cpu_features() if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


@dataclass(frozen=True)
class Measured:
    """One engine on one kind of machine, relative to eager fp32 channels_last."""

    speedup: float  # model-only images/s over eager fp32's
    setup_seconds: float  # first build: conversion + compilation
    cached_setup_seconds: float  # later builds, from the on-disk cache


# The avx2 rows: benchmarks/bench_engines.py on a 2-core AMD EPYC (Zen 3) KVM guest (flags avx
# avx2 fma f16c; no avx512*, avx512_bf16 or amx), ResNet-50 layer3+avgpool, avg pool, 224px,
# batch 16, speed-ups interleaved against eager fp32 channels_last, medians of 5, on a quiet
# machine (results/engines-2026-11-29-trace.txt): eager fp32 15.7 img/s, openvino THROUGHPUT
# 1.25x (2.9 s to convert, compile and run the first batch, 1.2 s from the cache), compile
# 1.16x (15.2 s). Under load (7-19 on 2 cores, results/engines-2026-11-29.txt) openvino led by
# more (1.92-1.97x) and compile 1.20-1.46x, with every setup slowed alike, so the images needed
# to win a setup back stay about the same. bf16 on this CPU: torch runs it at 0.15x fp32 (no
# native bf16), OpenVINO ignores the hint and runs f32 (1.24x). The inductor FX graph cache did
# not shorten a second compile in a fresh process (frozen weights), so compile's cached setup
# is its full setup.
REFERENCE_EAGER_FP32 = 15.7  # images/s, eager fp32, ResNet-50 224px on that machine
# What that reference network costs an image (torch's FlopCounterMode, `trace_layers`): another
# network's eager rate is estimated as REFERENCE_EAGER_FP32 scaled by the ratio of the FLOPs.
REFERENCE_FLOPS = 8.17e9
# The amx rows: a 2-core Xeon with AVX-512 and AMX, ResNet-50 at 224, batch 16, interleaved
# against eager fp32 channels_last (15.7 img/s quiet), medians of three runs (two quiet, one
# loaded): compile fp32 1.5/1.5/1.65 (13-16 s to compile), compile bf16 4.4/4.4/4.1, eager
# with bf16 weights 2.7/2.5/2.0, OpenVINO fp32 1.0/0.9/2.2 and bf16 2.3/2.1/6.2. OpenVINO's
# setup times are the avx2 row's.
MEASURED: dict[tuple[str, str, str], dict[str, Measured]] = {
    ("cpu", "amx", "fp32"): {
        "eager": Measured(1.0, 0.0, 0.0),
        "compile": Measured(1.5, 16.0, 16.0),
        "openvino": Measured(1.0, 2.9, 1.2),
    },
    ("cpu", "amx", "bf16"): {
        "eager": Measured(2.5, 0.0, 0.0),
        "compile": Measured(4.4, 16.0, 16.0),
        "openvino": Measured(2.3, 2.9, 1.2),
    },
    ("cpu", "avx2", "fp32"): {
        "eager": Measured(1.0, 0.0, 0.0),
        "compile": Measured(1.16, 15.2, 15.2),
        "openvino": Measured(1.25, 2.9, 1.2),
    },
    ("cpu", "avx2", "bf16"): {
        "eager": Measured(0.15, 0.0, 0.0),
        "compile": Measured(0.15, 63.0, 63.0),
        "openvino": Measured(1.24, 2.9, 1.2),
    },
}


def choose_engine(
    device: torch.device,
    precision: str,
    n_images: int,
    *,
    eager_rate: float | None = None,
    cached: frozenset[str] = frozenset(),
    available: frozenset[str] | None = None,
    flags: frozenset[str] | None = None,
) -> tuple[str, str]:
    """The engine `auto` should use, and why.

    Only measured rows count: the candidates are the engines in MEASURED for (device type, CPU
    class, precision), each with its speed-up over eager fp32. An engine is chosen when its
    setup is won back within this run, i.e. it minimises
        setup + n_images / (rate * speedup)
    where `rate` is the caller's eager fp32 rate for this model (images/s) or, without one, the
    reference ResNet-50 rate. `cached` names engines whose conversion is already on disk (their
    cached setup counts); `available` limits the candidates (e.g. openvino not installed).
    """
    key = (device.type, cpu_class(flags) if device.type == "cpu" else device.type, precision)
    table = MEASURED.get(key)
    row = "/".join(key)
    if not table:
        return "eager", f"no engine measurements for {row}"
    rate = eager_rate or REFERENCE_EAGER_FP32

    def seconds(name: str) -> float:
        m = table[name]
        setup = m.cached_setup_seconds if name in cached else m.setup_seconds
        return setup + n_images / (rate * m.speedup)

    candidates = [n for n in table if n == "eager" or available is None or n in available]
    best = min(candidates, key=seconds)
    eager = seconds("eager")
    if best == "eager":
        why = f"no measured engine wins back its setup within {n_images} images on {row}"
    else:
        why = (
            f"{table[best].speedup:.2f}x eager fp32 measured on {row}; its setup is won back: "
            f"~{seconds(best):.0f}s vs ~{eager:.0f}s eager for {n_images} images"
        )
    if table["eager"].speedup < 1:
        why += f" ({precision} eager runs at {table['eager'].speedup:.2f}x fp32 on this CPU)"
    return best, why


def resolve_engine(
    requested: str,
    device: torch.device,
    precision: str,
    n_images: int,
    key: str,
    flops: int = 0,
) -> tuple[str, str]:
    """`requested` ("auto" or an engine name) as an engine name, and the reason for `auto`'s
    choice ("" when the user named the engine). `flops` is what the tapped network costs an
    image (see `LayerInfo.flops`); 0 judges it as the reference ResNet-50."""
    if requested != "auto":
        return str(requested), ""
    if precision == "int8":
        int8 = [entry.name for entry in ENGINES.values() if "int8" in entry.precisions]
        return int8[0], f"int8 is {int8[0]}'s quantized model"
    available = frozenset(name for name, entry in ENGINES.items() if entry.available())
    cached = frozenset(name for name, entry in ENGINES.items() if entry.is_cached(key))
    rate = REFERENCE_EAGER_FP32 * REFERENCE_FLOPS / flops if flops else None
    return choose_engine(
        device, precision, n_images, eager_rate=rate, cached=cached, available=available
    )
