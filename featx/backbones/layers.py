"""Intermediate layers of a backbone: which can be selected, their shapes, and one forward pass
that returns several of them and stops after the deepest.

A layer is a module path (`features.23`, `layer3`, `blocks.4`) whose module runs exactly once
per forward pass; timm models also offer `forward_features`, the final feature map.
"""

from __future__ import annotations

import difflib
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from featx.backbones.registry import Backbone
from featx.backbones.tap import (
    FORWARD_FEATURES,
    LayerTap,
    forward_with_features,
    model_device,
    set_module,
)
from featx.errors import UsageError, check_range, first_line

__all__ = [
    "LayerInfo",
    "activation_bytes",
    "as_input",
    "check_poolable",
    "cpu_batch_size",
    "default_batch_size",
    "fold_batchnorm",
    "layer_table",
    "listed_layers",
    "pooled_shape",
    "prepare_tap",
    "resolve_layers",
    "trace_layers",
    "traced_activation_bytes",
]

LISTED_DEPTH = 2  # `featx layers` lists module paths with at most this many parts


@dataclass(frozen=True)
class LayerInfo:
    """A selectable layer: its name, module path, output shape for one image, and `flops`: the
    floating-point operations one image costs from the input up to this layer's output (0 when
    not traced)."""

    name: str
    module: str
    shape: tuple[int, ...]
    flops: int = 0

    def bytes_per_image(self, itemsize: int) -> int:
        n = itemsize
        for d in self.shape:
            n *= d
        return n


class _BatchNormLeafTracer(torch.fx.Tracer):
    """Keeps convs and BatchNorms, with their subclasses (timm's Conv2dSame, BatchNormAct2d),
    as single calls in the graph."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        leaf = isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
        return leaf or super().is_leaf_module(m, qualified_name)


def _without_batchnorm(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of a BatchNorm module once its affine map is folded into a conv."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if hasattr(bn, "act") and hasattr(bn, "drop"):  # timm's BatchNormAct2d
        return nn.Sequential(OrderedDict(drop=bn.drop, act=bn.act))  # keeps `bn1.act` tappable
    return None


def fold_batchnorm(model: nn.Module, keep: Iterable[str] = ()) -> list[str]:
    """Fold every eval-mode BatchNorm2d that only follows a Conv2d into that conv's weights.

    The BatchNorm module is replaced by what remains of it (Identity, or timm's activation),
    so hooks on it, and on every container, still see the same outputs. Convs in `keep`
    (layers whose own output is wanted) are left alone. Returns the folded BatchNorm paths;
    models that torch.fx cannot trace are left unchanged.
    """
    try:
        graph = _BatchNormLeafTracer().trace(model)
    except Exception:
        return []
    named = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    keep = set(keep)
    folded = []
    for node in graph.nodes:
        bn = named.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_mean is None:
            continue
        source = node.args[0]
        if not (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(named.get(source.target), nn.Conv2d)
            and len(source.users) == 1
            and calls[source.target] == calls[node.target] == 1
            and source.target not in keep
        ):
            continue
        rest = _without_batchnorm(bn)
        if rest is None:
            continue
        set_module(model, source.target, fuse_conv_bn_eval(named[source.target], bn))
        set_module(model, node.target, rest)
        folded.append(node.target)
    return folded


def check_poolable(model: nn.Module, layers: list[LayerInfo], pool: str) -> None:
    """UsageError unless `pool` can reduce every layer: it needs channels-first maps (C, H, W);
    vectors pass through unchanged, but token sequences and NHWC maps would be pooled wrongly."""
    if pool == "none":
        return
    nhwc = "NHWC" in str(getattr(model, "output_fmt", "NCHW"))
    for info in layers:
        if nhwc or len(info.shape) == 2:
            layout = "an NHWC map" if nhwc else "a token sequence"
            raise UsageError(
                f"--pool {pool} needs channels-first spatial maps, but layer {info.name} is "
                f"{layout} of shape {'x'.join(map(str, info.shape))}; use --pool none."
            )


def pooled_shape(shape: tuple[int, ...], pool: str) -> tuple[int, ...]:
    """The per-image shape that `pool` makes of a layer output of `shape` (C, H, W maps become
    vectors; `none` and other shapes keep theirs)."""
    if pool == "none" or len(shape) != 3:
        return tuple(shape)
    return (shape[0] * (2 if pool == "avgmax" else 1),)


def prepare_tap(
    model: nn.Module, modules: list[str], pool: str, device: torch.device, input_size: int
) -> LayerTap:
    """The tap that extraction and prediction both run: BatchNorm folded into convs, the model
    on `device` (channels_last except on MPS), and weights above the deepest layer freed."""
    fold_batchnorm(model, keep=modules)
    model = model.to(device)
    if device.type != "mps":
        model = model.to(memory_format=torch.channels_last)
    tap = LayerTap(model, modules, pool=pool)
    tap.drop_unreached(torch.zeros(1, 3, input_size, input_size, device=device))
    return tap


def as_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device` in the memory format `prepare_tap` put the model in."""
    x = batch.to(device, non_blocking=True)
    return x if device.type == "mps" else x.contiguous(memory_format=torch.channels_last)


def trace_layers(backbone: Backbone, model: nn.Module, input_size: int) -> list[LayerInfo]:
    """Every module that runs exactly once and outputs one tensor, in execution order, with its
    output shape and cumulative FLOPs for one image of `input_size` pixels square."""
    from torch.utils.flop_counter import FlopCounterMode

    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    flops: dict[str, int] = {}
    order: list[str] = []
    counter = FlopCounterMode(display=False)

    def record(path: str, out) -> None:
        calls[path] = calls.get(path, 0) + 1
        if path not in shapes:
            order.append(path)
        shapes[path] = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
        flops[path] = counter.get_total_flops()

    handles = [
        module.register_forward_hook(lambda _m, _i, out, path=path: record(path, out))
        for path, module in model.named_modules()
        if path
    ]
    try:
        with torch.inference_mode(), counter:
            x = torch.zeros(1, 3, input_size, input_size, device=model_device(model))
            forward_with_features(
                model,
                x,
                (lambda out: record(FORWARD_FEATURES, out)) if backbone.forward_features else None,
            )
    except (AssertionError, RuntimeError, ValueError) as error:  # e.g. a fixed input size
        first = first_line(error).rstrip(".")
        raise UsageError(
            f"{backbone.name} cannot run on {input_size}x{input_size} inputs ({first})."
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return [
        LayerInfo(backbone.layer_name(path), path, shapes[path], flops[path])
        for path in order
        if calls[path] == 1 and shapes[path] is not None
    ]


PROBE_SIZE = 64  # activation sizes are measured at this input size and scaled up
CHECKED_ABOVE = 512  # smaller inputs fit any machine featx runs on: no probe


def activation_bytes(backbone: Backbone, model: nn.Module, input_size: int) -> int:
    """Estimated peak activation memory of one image: the two largest consecutive layer
    outputs (a layer's input and output live together) in float32, measured at a small input
    size and scaled by area. 0 when the model cannot run at the probe size."""
    try:
        infos = trace_layers(backbone, model, PROBE_SIZE)
    except UsageError:  # e.g. a fixed input size: the real trace decides
        return 0
    return int(_peak_outputs(infos) * (input_size / PROBE_SIZE) ** 2) + 3 * 4 * input_size**2


def traced_activation_bytes(infos: list[LayerInfo], input_size: int) -> int:
    """`activation_bytes` from a trace at the input size itself (`trace_layers`), cut at the
    last layer a tap runs."""
    return _peak_outputs(infos) + 3 * 4 * input_size**2


def _peak_outputs(infos: list[LayerInfo]) -> int:
    sizes = [info.bytes_per_image(4) for info in infos]
    return max((a + b for a, b in zip(sizes, sizes[1:], strict=False)), default=sum(sizes))


MAX_BATCH = 32  # the batch off the CPU, and the memory check's batch when none is given
MAX_CPU_BATCH = 16
MIN_CPU_BATCH = 4
CPU_BATCH_BYTES = 256 * 2**20  # the activations of one CPU batch stay under this


def cpu_batch_size(per_image: int) -> int:
    """The batch size for a CPU run whose images each need `per_image` bytes of activations
    (`activation_bytes`): the largest power of two from 4 to MAX_CPU_BATCH whose batch fits in
    CPU_BATCH_BYTES. On the CPU 16 images run as fast as 32 (benchmarks/bench_batch.py, five
    networks: OpenVINO 0.95-1.06x, eager 0.93-1.19x) in half the activation memory. Never
    fewer than 4: OpenVINO splits a batch across its streams (two on 2 cores) only from twice
    their number, and ran batches of 2 at half its rate."""
    fits = CPU_BATCH_BYTES // max(1, per_image)
    return max(MIN_CPU_BATCH, min(MAX_CPU_BATCH, 1 << max(0, fits.bit_length() - 1)))


def default_batch_size(
    traced: list[LayerInfo], modules: list[str], input_size: int, device: torch.device
) -> tuple[int, str]:
    """The batch size for a tap of `modules` when the user gave none, and why: on the CPU,
    `cpu_batch_size` of the activations up to the deepest of them (`traced`: `trace_layers`
    at `input_size`); MAX_BATCH on other devices."""
    from featx.runtime import human_size

    if device.type != "cpu":
        return MAX_BATCH, f"on {device.type}"
    reached = [i for i, info in enumerate(traced) if info.module in modules]
    per_image = traced_activation_bytes(traced[: max(reached, default=len(traced)) + 1], input_size)
    why = f"on the CPU, for {human_size(per_image)} of activations per image"
    return cpu_batch_size(per_image), why


def batch_size_for_memory(
    backbone: Backbone, model: nn.Module, input_size: int, batch_size: int, available: int
) -> int:
    """The largest batch size up to `batch_size` whose activations fit in `available` bytes
    (keeping a quarter of it spare); UsageError when not even one image fits."""
    if input_size <= CHECKED_ABOVE:
        return batch_size
    per_image = activation_bytes(backbone, model, input_size)
    budget = available * 3 // 4
    if per_image > budget:
        from featx.runtime import human_size

        raise UsageError(
            f"one {input_size}x{input_size} image needs about {human_size(per_image)} of "
            f"activations in {backbone.name}, but only {human_size(available)} of memory is "
            "available; use a smaller --image-size."
        )
    return max(1, min(batch_size, budget // max(1, per_image)))


def listed_layers(layers: list[LayerInfo]) -> list[LayerInfo]:
    """The layers worth listing: aliased ones, `forward_features` and shallow module paths."""
    return [
        info
        for info in layers
        if info.name != info.module
        or info.module == FORWARD_FEATURES
        or info.module.count(".") < LISTED_DEPTH
    ]


def resolve_layers(
    backbone: Backbone, layers: list[LayerInfo], requested: list[str]
) -> list[LayerInfo]:
    """The LayerInfo for each requested name; UsageError listing the closest valid names."""
    by_name = {info.name: info for info in layers} | {info.module: info for info in layers}
    chosen = []
    for name in requested:
        info = by_name.get(backbone.module_path(name)) or by_name.get(name)
        if info is None:
            candidates = [i.name for i in listed_layers(layers)] + list(by_name)
            close = difflib.get_close_matches(
                name, list(dict.fromkeys(candidates)), n=6, cutoff=0.4
            )
            hint = (
                ", ".join(close) if close else ", ".join(i.name for i in listed_layers(layers)[-6:])
            )
            raise UsageError(
                f"{backbone.name} has no layer {name!r}; closest: {hint}. "
                f"Run `featx layers {backbone.name}` to see them all."
            )
        chosen.append(info)
    return list(dict.fromkeys(chosen))


def layer_table(backbone: str, image_size: int | None, n_images: int, all_layers: bool) -> str:
    """The `featx layers` table: name, module, shape, bytes per image and projected store size."""
    from featx.backbones.registry import get_backbone
    from featx.runtime import available_memory, human_size

    check_range("image-size", image_size, 16)
    check_range("n-images", n_images, 1)
    record = get_backbone(backbone)
    size = image_size if image_size is not None else record.default_preprocessing().input_size
    model = record.skeleton()
    batch_size_for_memory(record, model, size, 1, available_memory())
    infos = trace_layers(record, model, size)
    if not all_layers:
        infos = listed_layers(infos)
    header = (
        f"{'layer':<22} {'module':<20} {'shape':<14} {'f32/image':>10} {'f16/image':>10} "
        f"{f'f32 x{n_images}':>11} {f'f16 x{n_images}':>11}"
    )
    lines = [f"{record.name} at {size}x{size}", header]
    for info in infos:
        f32, f16 = info.bytes_per_image(4), info.bytes_per_image(2)
        lines.append(
            f"{info.name:<22} {info.module:<20} "
            f"{'x'.join(map(str, info.shape)):<14} {human_size(f32):>10} {human_size(f16):>10} "
            f"{human_size(f32 * n_images):>11} {human_size(f16 * n_images):>11}"
        )
    return "\n".join(lines)
