"""The engines measured on this machine for one network (`featx engines`): each candidate's
model-only rate on a random batch, its set-up, its set-up from featx's cache, and how far its
features are from eager fp32's; bf16 and int8 rows where the CPU has units for them. The table
is kept in featx's cache until the network, batch, machine or versions change."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from featx.inference import auto
from featx.runtime import atomic_write, cache_root

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["EngineRow", "engine_table", "format_table"]


@dataclass
class EngineRow:
    """One engine in one precision, measured here."""

    engine: str
    precision: str
    threads: int
    rate: float  # images/s, model only
    setup: float  # seconds, first build
    cached_setup: float | None  # seconds, built again from featx's cache (None: no cache)
    max_rel: float  # largest difference to eager fp32, relative to its largest value
    cosine: float  # lowest cosine of a row to eager fp32's
    note: str = ""


def _rows_for(precisions: list[str], device: torch.device) -> list[tuple[str, str]]:
    rows = []
    for precision in precisions:
        rows += [(name, precision) for name in auto.candidates(device, precision)]
    return rows


def _time(engine, batch: torch.Tensor) -> float:
    engine(batch)  # warm-up
    seconds = 0.0
    for _ in range(auto.BATCHES_EACH):
        start = time.perf_counter()
        engine(batch)
        seconds += time.perf_counter() - start
    return len(batch) * auto.BATCHES_EACH / seconds


def _compare(out: dict, ref: dict) -> tuple[float, float]:
    import torch

    rel, cos = 0.0, 1.0
    for name, r in ref.items():
        a, r = out[name].float().flatten(1), r.float().flatten(1)
        rel = max(rel, ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
        cos = min(cos, torch.cosine_similarity(a, r, dim=1).min().item())
    return rel, cos


def _measure_row(tap, name, precision, device, batch, key_of, ref) -> EngineRow:
    import torch

    from featx.inference.engine import Calibration
    from featx.inference.engines import ENGINES, build_engine

    options: dict[str, Any] = {}
    if precision == "int8":  # timing only: random images calibrate, with random-like weights
        options["calibration"] = Calibration(lambda: [batch], len(batch), 0, "featx-engines")
    key = key_of(precision, options.get("calibration"))
    start = time.perf_counter()
    engine = build_engine(tap, name, device, precision, batch, key, **options)
    setup = time.perf_counter() - start
    if engine.fallback_reason:
        return EngineRow(name, precision, torch.get_num_threads(), 0.0, setup, None, 0.0, 0.0,
                         engine.fallback_reason)  # fmt: skip
    cached_setup = None
    if ENGINES[name].is_cached(key):
        start = time.perf_counter()
        build_engine(tap, name, device, precision, batch, key, **options)
        cached_setup = time.perf_counter() - start
    rate = _time(engine, batch)
    rel, cos = _compare(engine(batch), ref)
    return EngineRow(name, precision, torch.get_num_threads(), rate, setup, cached_setup, rel, cos)


def engine_table(
    tap: nn.Module,
    *,
    device: torch.device,
    precisions: list[str],
    batch: torch.Tensor,
    key_of,
    remeasure: bool = False,
    log=lambda _: None,
) -> tuple[list[EngineRow], str]:
    """Every candidate engine in each of `precisions` on `batch` (random images), and the
    date it was measured; `key_of(precision, calibration)` names a conversion in featx's
    cache. A table cached for this signature is returned unless `remeasure`."""
    import torch

    from featx.inference.engine import digest
    from featx.inference.engines import build_engine
    from featx.inference.machine import machine_identity

    sig = auto.signature(key_of("fp32", None), len(batch), machine_identity(device, 0))
    sig["precisions"] = precisions
    path = cache_root() / "engines" / f"table-{digest(json.dumps(sig, sort_keys=True))}.json"
    if not remeasure:
        try:
            data = json.loads(path.read_text())
            if data["signature"] == sig:
                return [EngineRow(**row) for row in data["rows"]], data["measured"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    ref = build_engine(tap, "eager", device, "fp32", batch)(batch)
    rows = []
    threads = torch.get_num_threads()
    for name, precision in _rows_for(precisions, device):
        log(f"measuring {name} {precision} ...")
        rows.append(_measure_row(tap, name, precision, device, batch, key_of, ref))
    if threads > 1:  # what auto also weighs: torch on fewer threads
        torch.set_num_threads(threads - 1)
        try:
            rows.append(_measure_row(tap, "eager", "fp32", device, batch, key_of, ref))
        finally:
            torch.set_num_threads(threads)
    measured = auto.today()
    record = {"signature": sig, "measured": measured, "rows": [asdict(r) for r in rows]}
    try:
        atomic_write(path, (json.dumps(record, indent=1) + "\n").encode())
    except Exception:  # noqa: BLE001 - an unwritable cache only means measuring again
        pass
    return rows, measured


def format_table(rows: list[EngineRow]) -> str:
    """The table as text, rates relative to eager fp32 on torch's own threads."""
    base = next((r.rate for r in rows if (r.engine, r.precision) == ("eager", "fp32")), 0.0)
    lines = [
        f"{'engine':<10} {'precision':<9} {'threads':>7} {'img/s':>8} {'vs eager':>8} "
        f"{'set-up s':>8} {'cached s':>8} {'max rel diff':>12} {'min cosine':>10}"
    ]
    for r in rows:
        if not r.rate:
            lines.append(f"{r.engine:<10} {r.precision:<9} not available: {r.note}")
            continue
        cached = f"{r.cached_setup:8.1f}" if r.cached_setup is not None else f"{'-':>8}"
        ratio = f"{r.rate / base:7.2f}x" if base else f"{'-':>8}"
        lines.append(
            f"{r.engine:<10} {r.precision:<9} {r.threads:>7} {r.rate:8.1f} {ratio} "
            f"{r.setup:8.1f} {cached} {r.max_rel:12.1e} {r.cosine:10.5f}"
        )
    return "\n".join(lines)


def measure_engines(
    backbone: str | None,
    layers: list[str],
    *,
    weights: str = "default",
    image_size: int | None = None,
    pool: str = "none",
    precision: str = "fp32",
    batch_size: int | None = None,
    device: str = "auto",
    remeasure: bool = False,
    log=lambda _: None,
) -> str:
    """The engine table for `backbone`'s `layers` as `featx extract` would run them (same
    tap, batch size and conversion cache), with a header naming the CPU and its flags."""
    import torch

    from featx.backbones.layers import prepare_tap, resolve_layers, trace_layers
    from featx.backbones.registry import get_backbone
    from featx.errors import UsageError
    from featx.inference.engine import cache_key
    from featx.inference.machine import cpu_description, precisions_with_units
    from featx.inference.network import choose_batch_size
    from featx.runtime import inference_device

    if not backbone or not layers:
        raise UsageError("give --backbone and at least one --layer.")
    record = get_backbone(backbone)
    size = image_size or record.default_preprocessing(weights).input_size
    dev = inference_device(device, precision, "auto")
    traced = trace_layers(record, record.skeleton(weights), size)
    modules = [i.module for i in resolve_layers(record, traced, list(layers))]
    if batch_size is None:
        batch_size, _ = choose_batch_size(traced, modules, size, dev)
    loaded = record.load(weights, modules, size)
    tap = prepare_tap(loaded.model, modules, pool, dev, size)

    def key_of(p: str, calibration) -> str:
        return cache_key(loaded.name, loaded.weights_sha256, modules, pool, size, p, "extract",
                         calibration.key() if calibration else "")  # fmt: skip

    precisions = [precision]
    if dev.type == "cpu":
        precisions += [p for p in precisions_with_units() if p not in precisions]
    batch = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    rows, measured = engine_table(tap, device=dev, precisions=precisions, batch=batch,
                                  key_of=key_of, remeasure=remeasure, log=log)  # fmt: skip
    cpu = cpu_description()
    units = [f for f in cpu["flags"] if f.startswith(("avx", "amx", "fma", "f16c"))]
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu["model"]
    head = (
        f"{loaded.name} {'+'.join(modules)} pool={pool} {size}px batch {batch_size}, "
        f"{where} ({cpu['logical']} cores; {' '.join(units) or 'no vector flags'}), "
        f"measured here {measured}"
    )
    return head + "\n" + format_table(rows)
