"""The network that fine-tuning trains: a backbone cut after one layer, pooling, and a head.

Nothing above the chosen layer runs (modules that would never run are dropped, so checkpoints
stay small). The base is divided into *blocks*, the units that get their own learning rate:

- the top-level children of the model in execution order, except that when exactly one of them
  is a plain container (`nn.Sequential`/`nn.ModuleList`) of three or more parameterised children,
  that container is opened up: torchvision's `features.N`, timm's `blocks.N`, while ResNet keeps
  `layer1` ... `layer4`;
- a unit holding only normalisation layers joins the unit before it (`conv1` + `bn1`);
- with Keras layer names (VGG), units are grouped by Keras block: `block1` ... `block5`.

`--unfreeze-from LAYER` makes every parameter from LAYER on trainable: parameters of modules
whose forward starts at or after LAYER's, where a Keras name covers its whole Keras layer
(`block5_conv1` is torchvision's conv `features.24` and its ReLU `features.25`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featx.backbones.layers import (
    LayerInfo,
    check_poolable,
    pooled_shape,
    resolve_layers,
    trace_layers,
)
from featx.backbones.registry import POOLS, Backbone
from featx.backbones.tap import FORWARD_FEATURES, pool_features
from featx.errors import UsageError, check_choice
from featx.finetuning.config import BN_MODES
from featx.models.heads import make_head

__all__ = ["Block", "Network", "build_network", "default_layer"]

HEAD_NAME = "head"
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_CONTAINERS = (nn.Sequential, nn.ModuleList)


class _Stop(Exception):
    """Carries the feature layer's output out of the backbone's forward."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output


@dataclass(frozen=True)
class Block:
    """A learning-rate unit of the base: its name, module paths and parameter names."""

    name: str
    modules: tuple[str, ...]
    params: tuple[str, ...]


def default_layer(backbone: Backbone, infos: list[LayerInfo], model: nn.Module) -> LayerInfo:
    """The final feature map: timm's `forward_features`, else the last top-level module with
    weights whose output is a spatial map (`features` for VGG/MobileNet/EfficientNet,
    `layer4` for ResNet, `Mixed_7c` for Inception)."""
    by_module = {i.module: i for i in infos}
    if backbone.source == "timm" and FORWARD_FEATURES in by_module:
        return by_module[FORWARD_FEATURES]
    children = dict(model.named_children())
    maps = [
        i
        for i in infos
        if i.module in children
        and len(i.shape) == 3
        and any(True for _ in children[i.module].parameters())
    ]
    if not maps:
        raise UsageError(f"{backbone.name} has no spatial feature map; pass --layer.")
    return maps[-1]


class Network(nn.Module):
    """`base` run up to `layer`, pooled or flattened, then `head` (logits)."""

    def __init__(self, base: nn.Module, layer: str, pool: str, head: nn.Sequential):
        super().__init__()
        check_choice("pool", pool, POOLS)
        self.base, self.head = base, head
        self.layer, self.pool = layer, pool
        self.blocks: list[Block] = []
        self._dropped: dict[str, nn.Module] = {}
        self._start: dict[str, int] = {}  # module path in base -> execution start index
        self._owner: dict[str, str] = {}  # parameter name in base -> owning module path

    # ---- forward ------------------------------------------------------------------------
    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The feature layer's output; nothing above it runs."""
        if self.layer == FORWARD_FEATURES:
            return self.base.forward_features(x)
        module = self.base.get_submodule(self.layer)

        def stop(_module, _inputs, output):
            raise _Stop(output)

        handle = module.register_forward_hook(stop)
        try:
            self.base(x)
        except _Stop as stopped:
            return stopped.output
        finally:
            handle.remove()
        raise RuntimeError(f"layer {self.layer} did not run")  # pragma: no cover

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled (or flattened) feature vector the head sees."""
        out = self.base_output(x)
        if self.pool == "none" or out.ndim != 4:
            return out.flatten(1)
        return pool_features(out, self.pool)

    def forward(self, x: torch.Tensor, frozen_base: bool = False) -> torch.Tensor:
        """Logits; with `frozen_base` the base runs without recording gradients."""
        if frozen_base:
            with torch.no_grad():
                f = self.features(x)
        else:
            f = self.features(x)
        return self.head(f)

    @contextlib.contextmanager
    def whole_backbone(self) -> Iterator[nn.Module]:
        """The base with the modules cut off above the feature layer put back (the whole
        backbone, e.g. to save it as a weights file); they are removed again afterwards."""
        for path, module in self._dropped.items():
            parent, _, child = path.rpartition(".")
            setattr(self.base.get_submodule(parent), child, module)
        try:
            yield self.base
        finally:
            for path in self._dropped:
                parent, _, child = path.rpartition(".")
                setattr(self.base.get_submodule(parent), child, nn.Identity())

    # ---- structure ----------------------------------------------------------------------
    def index_structure(self, backbone: Backbone, input_size: int) -> None:
        """Trace the execution order, drop modules that never run, and form the blocks."""
        starts: dict[str, int] = {}

        def started(path: str) -> None:
            starts.setdefault(path, len(starts))

        handles = [
            m.register_forward_pre_hook(lambda _m, _i, path=path: started(path))
            for path, m in self.base.named_modules()
        ]
        was_training = self.base.training
        self.base.eval()
        try:
            with torch.no_grad():
                self.base_output(torch.zeros(1, 3, input_size, input_size))
        finally:
            for h in handles:
                h.remove()
            self.base.train(was_training)
        self._dropped = _drop_unused(self.base, starts)  # kept off the module tree, on the CPU
        starts.setdefault("", -1)  # the root can own parameters (a ViT's pos_embed) and not run
        self._start = starts
        self._owner = {}
        for path, module in self.base.named_modules():
            for name, _ in module.named_parameters(recurse=False):
                self._owner[f"{path}.{name}" if path else name] = path
        self.blocks = _blocks(backbone, self.base, starts, self._owner)

    def start_of(self, backbone: Backbone, info: LayerInfo) -> int:
        """The execution index from which `--unfreeze-from info` trains everything."""
        if info.module not in self._start or info.module == "":
            raise UsageError(
                f"--unfreeze-from {info.name} is not in the base below the feature layer "
                f"{backbone.layer_name(self.layer)}; choose a layer at or before it."
            )
        if info.name == info.module:
            return self._start[info.module]
        # A Keras name covers everything after the previous Keras layer (conv + its ReLU).
        own = self._start[info.module]
        previous = [
            p for p in backbone.aliases.values() if p in self._start and self._start[p] < own
        ]
        if not previous:  # the first Keras layer: the whole base
            return self.default_unfreeze_start()
        last = max(previous, key=self._start.__getitem__)
        return min(
            s
            for p, s in self._start.items()
            if s > self._start[last] and not p.startswith(last + ".")
        )

    def default_unfreeze_start(self) -> int:
        """The default `--unfreeze-from`: the whole base (its earliest block) trains in stage 2,
        each block at its layer-dependent rate; measured on the Fashion-MNIST example, unfreezing
        only the last blocks never beat the head (docs: design notes)."""
        return self._start[self.blocks[0].modules[0]] if self.blocks else 0

    def unfreeze_layer_name(self, backbone: Backbone, start: int) -> str:
        """The layer name (Keras name when there is one) that unfreezes from `start`."""
        for alias, path in backbone.aliases.items():
            if path in self._start:
                info = LayerInfo(alias, path, ())
                if self.start_of(backbone, info) == start:
                    return alias
        return min((p for p, s in self._start.items() if s >= start), key=self._start.get)

    def trainable_base_params(self, start: int | None) -> set[str]:
        """Names of base parameters that train when unfreezing from `start` (None: none)."""
        if start is None:
            return set()
        return {n for n, owner in self._owner.items() if self._start[owner] >= start}

    def set_trainable(self, start: int | None) -> None:
        """requires_grad: the head always; base parameters from `start` on (None: none)."""
        trainable = self.trainable_base_params(start)
        for name, p in self.base.named_parameters():
            p.requires_grad_(name in trainable)
        for p in self.head.parameters():
            p.requires_grad_(True)

    def set_modes(self, start: int | None, bn: str) -> None:
        """Training mode: the head trains; base modules from `start` on train, except that
        BatchNorm keeps its running statistics (eval) unless `bn` is "train"; the rest of the
        base, and all of it when `start` is None, runs in eval mode."""
        check_choice("bn", bn, BN_MODES)
        self.train()
        for path, module in self.base.named_modules():
            on = start is not None and self._start.get(path, -1) >= start
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and bn == "frozen":
                on = False
            module.training = on

    def param_groups(
        self, start: int | None, lr: float, lr_mult: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        """Optimiser groups, earliest block first, head last: the head at `lr`, each earlier
        trainable block at `lr_mult` times the rate of the next later one."""
        trainable = self.trainable_base_params(start)
        params = dict(self.base.named_parameters())
        groups = [
            (block.name, [params[n] for n in block.params if n in trainable])
            for block in self.blocks
        ]
        groups = [(name, ps) for name, ps in groups if ps]
        groups.append((HEAD_NAME, list(self.head.parameters())))
        out = []
        for depth, (name, ps) in enumerate(reversed(groups)):
            out.append(
                {
                    "params": ps,
                    "lr": lr * lr_mult**depth,
                    "weight_decay": weight_decay,
                    "name": name,
                }
            )
        return out[::-1]


def _drop_unused(base: nn.Module, starts: dict[str, int]) -> dict[str, nn.Module]:
    """Replace modules with weights that never run below the feature layer by nn.Identity;
    returns them by path."""
    dropped = {}
    for path, module in list(base.named_modules()):
        if not path or path in starts or not any(True for _ in module.parameters()):
            continue
        parent_path, _, child = path.rpartition(".")
        if parent_path in starts or parent_path == "":
            setattr(base.get_submodule(parent_path), child, nn.Identity())
            dropped[path] = module
    return dropped


def _is_norm_only(module: nn.Module) -> bool:
    owners = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    return bool(owners) and all(isinstance(m, _NORMS) for m in owners)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _units(base: nn.Module, starts: dict[str, int]) -> list[str]:
    """Module paths of the base's units, in execution order (see the module docstring)."""
    children = [(n, m) for n, m in base.named_children() if n in starts and _has_params(m)]
    containers = [
        n
        for n, m in children
        if type(m) in _CONTAINERS and sum(_has_params(c) for c in m.children()) >= 3
    ]
    units: list[str] = []
    for name, module in children:
        if containers == [name]:
            units += [
                f"{name}.{c}"
                for c, m in module.named_children()
                if f"{name}.{c}" in starts and _has_params(m)
            ]
        else:
            units.append(name)
    return sorted(units, key=starts.__getitem__)


def _blocks(
    backbone: Backbone, base: nn.Module, starts: dict[str, int], owner: dict[str, str]
) -> list[Block]:
    names: list[str] = []
    members: list[list[str]] = []
    aliased = sorted(
        (starts[p], a.split("_")[0]) for a, p in backbone.aliases.items() if p in starts
    )
    for unit in _units(base, starts):
        module = base.get_submodule(unit)
        name = unit
        if aliased:
            later = [block for s, block in aliased if s >= starts[unit]]
            name = later[0] if later else aliased[-1][1]
        if names and (name == names[-1] or _is_norm_only(module)):
            members[-1].append(unit)
        else:
            names.append(name)
            members.append([unit])
    blocks = []
    for name, units in zip(names, members, strict=True):
        prefixes = tuple(u + "." for u in units)
        params = [n for n, o in owner.items() if o in units or o.startswith(prefixes)]
        blocks.append(Block(name, tuple(units), tuple(params)))
    return blocks


def build_network(
    backbone: Backbone,
    model: nn.Module,
    input_size: int,
    n_classes: int,
    *,
    layer: str | None = None,
    pool: str = "avg",
    hidden_sizes: Sequence[int] = (256,),
    dropout: float = 0.5,
    head: nn.Sequential | None = None,
    seed: int = 0,
    infos: list[LayerInfo] | None = None,
) -> tuple[Network, LayerInfo]:
    """A Network on `model` cut after `layer` (default: the final feature map), with a new
    head seeded by `seed`, or `head` when given. Returns it with the feature layer's info."""
    if infos is None:
        infos = trace_layers(backbone, model, input_size)
    info = (
        default_layer(backbone, infos, model)
        if layer is None
        else resolve_layers(backbone, infos, [layer])[0]
    )
    check_poolable(model, [info], pool)
    if head is None:
        n_in = math.prod(pooled_shape(info.shape, pool))
        input_dropout = 0.0 if hidden_sizes else dropout  # a linear head drops features
        head = make_head(
            n_in,
            list(hidden_sizes),
            dropout,
            n_classes,
            input_dropout=input_dropout,
            generator=torch.Generator().manual_seed(seed),
        )
    net = Network(model, info.module, pool, head)
    net.index_structure(backbone, input_size)
    return net, info
