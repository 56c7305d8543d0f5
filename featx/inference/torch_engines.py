"""The engines PyTorch runs itself: eager, and torch.compile (inductor, frozen weights)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from featx.inference.engine import CONVERSIONS, DTYPES, Engine, as_input, cast, to_float
from featx.runtime import cache_root

__all__ = ["compile_engine", "eager_engine"]

# torch.compile and NNCF import it, and on a machine without CUDA it warns so on stderr.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def eager_engine(tap: nn.Module, device: torch.device, precision: str = "fp32") -> Engine:
    """The tap as it is (channels_last), weights cast to bf16/fp16 when asked (real
    low-precision weights, not autocast), under inference_mode."""
    model = cast(tap, precision)
    dtype = DTYPES[precision]

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return to_float(model(as_input(batch, device, dtype)))

    return Engine("eager", precision, device, run, details="channels_last")


def enable_inductor_cache(root: Path) -> None:
    """Point inductor's on-disk caches (FX graph cache, compiled kernels) under our root unless
    the user chose a directory. Torch writes its /tmp default into the environment the first
    time anything asks (importing timm does), so that default counts as not chosen."""
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")

    inductor_config.fx_graph_cache = True


def compile_engine(
    tap: nn.Module,
    device: torch.device,
    precision: str,
    example: torch.Tensor,
    mode: str = "default",
) -> Engine:
    """torch.compile (inductor) with frozen weights, for one batch size.

    The tap stops its forward by raising from a hook, which dynamo cannot follow in one graph,
    so the tap is first traced with make_fx (plain Python runs; the graph records the ops that
    executed) and the resulting FX graph is compiled. The graph is specialised to the example's
    batch size: smaller batches are zero-padded to it and larger ones split, so the last short
    batch of a run never triggers a second compilation.
    """
    from torch._inductor import config as inductor_config
    from torch.fx.experimental.proxy_tensor import make_fx

    enable_inductor_cache(cache_root())
    model = cast(tap, precision)
    dtype = DTYPES[precision]
    x = as_input(example, device, dtype)
    size = x.shape[0]
    start = time.perf_counter()
    with torch.no_grad():
        graph = make_fx(model, tracing_mode="real")(x)
    compiled = torch.compile(graph, mode=mode, dynamic=False)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        compiled(x)  # compiles now, so setup time is paid (and measured) here
    CONVERSIONS["compile"] += 1
    setup = time.perf_counter() - start

    def run_full(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return to_float(compiled(x))

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = as_input(batch, device, dtype)
        n = x.shape[0]
        if n == size:
            return run_full(x)
        parts = []
        for begin in range(0, n, size):
            part = x[begin : begin + size]
            short = part.shape[0]
            if short < size:
                pad = part.new_zeros((size - short, *part.shape[1:]))
                part = torch.cat([part, pad]).contiguous(memory_format=torch.channels_last)
            out = run_full(part)
            parts.append({k: v[:short] for k, v in out.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    return Engine("compile", precision, device, run, setup, details=f"mode={mode}, batch={size}")
