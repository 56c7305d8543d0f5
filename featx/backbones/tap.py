"""The layer tap every stage runs: one forward pass that returns the outputs of several
modules of a network and stops as soon as the deepest of them has run."""

from __future__ import annotations

import torch
from torch import nn

from featx.errors import UsageError

__all__ = [
    "FORWARD_FEATURES",
    "LayerTap",
    "forward_with_features",
    "model_device",
    "pool_features",
    "set_module",
]

FORWARD_FEATURES = "forward_features"  # a timm model's final feature map, offered as a layer


class _StopForward(Exception):
    """Raised from a hook once every requested layer has its output."""


def model_device(model: nn.Module) -> torch.device:
    """Where a model's parameters are: `meta` for a `Backbone.skeleton`."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the module path `path` of `model`."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def pool_features(x: torch.Tensor, pool: str) -> torch.Tensor:
    """Reduce the spatial dimensions of an NCHW map; other shapes pass through."""
    if pool == "none" or x.ndim != 4:
        return x
    if pool == "avg":
        return x.mean(dim=(2, 3))
    if pool == "max":
        return x.amax(dim=(2, 3))
    return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def forward_with_features(model: nn.Module, x: torch.Tensor, on_forward_features) -> None:
    """Run `model` on `x`; for a timm model, through `forward_features` (whose output goes to
    `on_forward_features`, unless None) and `forward_head`."""
    if on_forward_features is None or not hasattr(model, "forward_features"):
        model(x)
        return
    features = model.forward_features(x)
    on_forward_features(features)
    model.forward_head(features)


class LayerTap(nn.Module):
    """Runs `model` on a batch and returns {module path: output} for the requested layers.

    All layers come from one forward pass, which stops as soon as the deepest requested layer
    has run. `pool` reduces spatial maps before they leave the tap.
    """

    def __init__(self, model: nn.Module, modules: list[str], pool: str = "none"):
        super().__init__()
        self.model = model
        self.modules_wanted = list(dict.fromkeys(modules))
        self.pool = pool
        named = dict(model.named_modules())
        for path in self.modules_wanted:
            if path != FORWARD_FEATURES and path not in named:
                raise UsageError(f"the model has no module {path!r}.")
        self._targets = {path: named[path] for path in self.modules_wanted if path in named}

    def drop_unreached(self, example: torch.Tensor) -> list[str]:
        """Replace the weighted leaf modules that the early-stopping pass never runs with
        Identity, freeing their memory (VGG16's classifier is 400 MB). Returns their paths."""
        ran: set[str] = set()
        leaves = {
            path: module
            for path, module in self.model.named_modules()
            if path
            and not any(module.children())
            and any(True for _ in module.parameters(recurse=False))
        }
        handles = [
            module.register_forward_pre_hook(lambda _m, _i, path=path: ran.add(path))
            for path, module in leaves.items()
        ]
        try:
            with torch.inference_mode():
                self(example)
        finally:
            for handle in handles:
                handle.remove()
        unreached = [path for path in leaves if path not in ran]
        for path in unreached:
            set_module(self.model, path, nn.Identity())
        return unreached

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}

        def keep(path: str, value) -> None:
            if path in outputs:
                raise UsageError(f"layer {path!r} runs more than once per forward pass.")
            if not isinstance(value, torch.Tensor):
                raise UsageError(f"layer {path!r} does not output a single tensor.")
            # A copy: later in-place ops (ReLU(inplace=True), `out += identity`) would change it.
            pooled = pool_features(value, self.pool)
            outputs[path] = pooled.clone() if pooled is value else pooled
            if len(outputs) == len(self.modules_wanted):
                raise _StopForward

        handles = [
            module.register_forward_hook(lambda _m, _i, out, path=path: keep(path, out))
            for path, module in self._targets.items()
        ]
        want_ff = FORWARD_FEATURES in self.modules_wanted
        try:
            on_features = (lambda out: keep(FORWARD_FEATURES, out)) if want_ff else None
            forward_with_features(self.model, x, on_features)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {path: outputs[path] for path in self.modules_wanted}
