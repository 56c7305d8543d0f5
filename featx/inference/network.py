"""A tapped network from its trace to a running engine, as extraction and prediction both set
it up: the batch size chosen for the layers it computes, the engine resolved for the run, and
the engine started after the decoding processes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from featx.backbones.layers import LayerInfo
    from featx.inference.engine import Calibration, Engine

__all__ = ["choose_batch_size", "network_flops", "start_engine", "stderr_log"]

Log = Callable[[str], None]


def stderr_log(quiet: bool) -> Log:
    """Print a line on stderr, or nothing when `quiet`; a progress bar being drawn (`auto`
    says its choice during the run) is moved below the line."""
    if quiet:
        return lambda *_: None

    def log(text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)

    return log


def network_flops(traced: Iterable[LayerInfo], modules: Iterable[str]) -> int:
    """What the tap of `modules` costs an image: the FLOPs up to the deepest of them."""
    wanted = set(modules)
    return max((i.flops for i in traced if i.module in wanted), default=0)


def choose_batch_size(
    traced: list[LayerInfo],
    modules: list[str],
    input_size: int,
    device: torch.device,
    views: int = 1,
) -> tuple[int, str]:
    """The batch size when the user gave none, and why (`default_batch_size`), in items of
    `views` inputs each (an image and its test-time views run in one forward pass)."""
    from featx.backbones.layers import default_batch_size

    inputs, why = default_batch_size(traced, modules, input_size, device)
    return max(1, inputs // views), why


def start_engine(
    loader: Iterable,
    tap: nn.Module,
    engine: str,
    why: str,
    *,
    precision: str,
    device: torch.device,
    example: torch.Tensor,
    key: str,
    calibration: Calibration | None = None,
    log: Log,
) -> tuple[Iterator, Engine]:
    """Start the loader's decoding processes, then the engine `engine` for `tap` (`example`:
    one full batch), saying which engine runs and why. Returns the batches and the engine.

    `auto` is chosen from this machine's measurements for this signature, or measured on the
    loader's first batches (`featx.inference.race`); the engine returned then says in `name`
    which engine computed the last batch, and in `choice` how it was chosen."""
    # engines import torch: a cached re-run and a usage error never reach this point
    from featx.inference.engine import INT8_COSINE
    from featx.inference.engines import build_engine, is_cached

    if engine != "auto":
        log(f"Engine: {engine}" + (f" ({why})." if why else "."))
    # The decoding processes fork here, before an engine starts its own thread pool
    # (OpenVINO's does not survive a fork beside it).
    batches = iter(loader)
    if engine == "auto":
        from featx.inference.race import start_auto

        def build(name: str, threads: int | None) -> Engine:
            options = {} if threads is None else {"ov_threads": threads}
            return build_engine(tap, name, device, precision, example, key=key, **options)

        chosen = start_auto(
            build, key=key, device=device, precision=precision, batch_size=len(example),
            n_batches=len(loader), workers=getattr(loader, "num_workers", 0), log=log,
        )  # fmt: skip
        return batches, chosen
    if calibration is not None and not is_cached(engine, key):
        log(
            f"Quantizing to int8 on {calibration.n_images} calibration images (once on "
            "this machine: the quantized model is cached)."
        )
    built = build_engine(tap, engine, device, precision, example, key=key, calibration=calibration)
    if built.fallback_reason:
        log(f"Engine: {built.describe()}.")
    low = built.quality and built.quality["cosine_min"] < INT8_COSINE
    if calibration is not None and low:
        log(
            f"Warning: int8 features are below cosine {INT8_COSINE} to fp32 on some calibration "
            f"images (min {built.quality['cosine_min']:.4f}, median "
            f"{built.quality['cosine_median']:.4f}); compare with an fp32 store before relying "
            "on them."
        )
    return batches, built
