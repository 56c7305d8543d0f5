"""The backbone registry: one record per model holding its constructor, weights,
preprocessing and layer names.

Names are built-in backbones (`vgg16`, `resnet50`, `efficientnet_lite0`, ...) or `SOURCE:NAME`
for any model of a source (`timm:convnext_nano`, `torchvision:regnet_y_400mf`). Weights are
`default`, a named set (`IMAGENET1K_V1`, `in1k`), `none` (seeded random init) or a local
state-dict file.

A source is one module in `featx/backbones/sources/` whose builder is registered with
`@register_backbone("SOURCE:")`; a built-in backbone is one `register_backbone(NAME)` there.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from featx.backbones.weights import Checkpoint, file_sha256, is_named, state_dict_sha256
from featx.data.preprocessing import Preprocessing
from featx.errors import UsageError

if TYPE_CHECKING:  # torch and torchvision load only when a network is built or run
    from torch import nn

__all__ = [
    "POOLS",
    "RANDOM_INIT_SEED",
    "Backbone",
    "Builder",
    "LoadedBackbone",
    "Weights",
    "available_backbones",
    "available_sources",
    "backbone_help",
    "get_backbone",
    "register_backbone",
]

RANDOM_INIT_SEED = 0
POOLS = ("none", "avg", "max", "avgmax")  # "none" keeps maps; a network head flattens them


@dataclass(frozen=True)
class Weights:
    """One named set of pretrained weights, as torchvision's `Weights(url, transforms, meta)`:
    its identity, the preprocessing it was trained with, the architecture it fills and where
    its file is. The callables import their library only when called."""

    identity: str  # e.g. "torchvision:VGG16_Weights.IMAGENET1K_V1"
    preprocessing: Preprocessing
    architecture: Callable[[], nn.Module]  # the model these weights fill, with random values
    file: Callable[[], Path]  # the local file, downloaded into its library's cache if missing
    # (keys in the file, keys of the model) -> the model key of each file key
    rename: Callable[[list[str], list[str]], list[str]] | None = None


@dataclass
class LoadedBackbone:
    """A backbone built with weights: the model in eval mode and what identifies it."""

    name: str
    model: nn.Module
    weights: str  # identity, e.g. "torchvision:VGG16_Weights.IMAGENET1K_V1"
    weights_sha256: str
    preprocessing: Preprocessing
    weights_spec: str  # what to pass to Backbone.load to get these weights again


@dataclass(frozen=True)
class Backbone:
    """One model the registry knows: how to build it, load weights and name its layers."""

    name: str
    source: str  # the source that made the record: "torchvision", "timm", ...
    architecture: str  # the source's name of the model
    constructor: Callable[[], nn.Module]  # the architecture with random weights
    named_weights: Callable[[str], Weights]  # "default" or a set's name -> its Weights
    # The default weights when known without importing the model library (fast start-up);
    # tests/test_backbones.py checks them against the library.
    default: Weights | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)  # friendly name -> module path
    forward_features: bool = False  # the model offers `forward_features` as a layer

    # ---- construction -------------------------------------------------------------------
    def build(self) -> nn.Module:
        """The architecture with random weights (seed them to make them reproducible)."""
        _check_inductor_cache()
        return self.constructor()

    def weights(self, weights: str = "default") -> Weights:
        """The named weights set `weights` ("default" or a name such as `IMAGENET1K_V1`)."""
        if weights == "default" and self.default is not None:
            return self.default
        return self.named_weights(weights)

    def skeleton(self, weights: str = "default") -> nn.Module:
        """The architecture that `load(weights)` fills, in eval mode, holding no weights: its
        tensors on the meta device, which knows shapes and allocates nothing. Models that
        cannot be built or run there (a constructor or forward that reads a tensor's values,
        or buffers that no checkpoint holds) are built on the CPU with random weights."""
        import torch

        _check_inductor_cache()
        architecture = self.weights(weights).architecture if is_named(weights) else self.build
        try:
            with torch.device("meta"):
                model = architecture().eval()
            persistent = set(model.state_dict())
            if all(name in persistent for name, _ in model.named_buffers()):
                size = self.default_preprocessing(weights).input_size
                with torch.inference_mode():
                    model(torch.zeros(1, 3, size, size, device="meta"))
                return model
        except UsageError:
            raise
        except Exception:
            pass
        return architecture().eval()

    def default_preprocessing(self, weights: str = "default") -> Preprocessing:
        """The preprocessing of the named weights (the default set's for `none` or a file)."""
        return self.weights(weights if is_named(weights) else "default").preprocessing

    def weights_identity(self, weights: str = "default") -> str:
        """A stable name for a weights choice, known without loading anything."""
        if weights == "none":
            return f"none (random init, seed {RANDOM_INIT_SEED})"
        if not is_named(weights):
            path = Path(weights)
            if not path.is_file():
                raise UsageError(f"weights file {path} does not exist.")
            return f"file:{path.name} sha256:{file_sha256(path)[:16]}"
        return self.weights(weights).identity

    def load(
        self,
        weights: str = "default",
        modules: Sequence[str] | None = None,
        input_size: int | None = None,
    ) -> LoadedBackbone:
        """Build the model with its weights, in eval mode, on CPU.

        With `modules`, only what a forward pass up to the deepest of them runs gets weights:
        the other weighted modules become Identity and their tensors are never read (VGG16's
        500 MB classifier for `block5_pool`). `weights_sha256` covers every tensor either way.
        """
        import torch

        from featx.backbones.tap import LayerTap, model_device

        preprocessing = self.default_preprocessing(weights)
        identity = self.weights_identity(weights)
        if weights == "none":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = self.build().eval()
            checkpoint, sha256 = None, state_dict_sha256(model)
        else:
            named = self.weights(weights) if is_named(weights) else None
            checkpoint = (
                Checkpoint(named.file(), named.rename) if named else Checkpoint(Path(weights))
            )
            model = self.skeleton(weights)
            checkpoint.fit(model, self.name)
            sha256 = checkpoint.sha256()
        if modules is not None:
            size = input_size or preprocessing.input_size
            LayerTap(model, list(modules)).drop_unreached(
                torch.zeros(1, 3, size, size, device=model_device(model))
            )
        if checkpoint is not None:
            checkpoint.load_into(model)
        spec = weights if is_named(weights) or weights == "none" else str(Path(weights).resolve())
        return LoadedBackbone(self.name, model, identity, sha256, preprocessing, spec)

    # ---- layers -------------------------------------------------------------------------
    def module_path(self, layer: str) -> str:
        """The module path behind a layer name (Keras aliases resolve; others pass through)."""
        return self.aliases.get(layer, layer)

    def layer_name(self, module_path: str) -> str:
        """The name featx stores a layer under: its alias when it has one."""
        for alias, path in self.aliases.items():
            if path == module_path:
                return alias
        return module_path


def _check_inductor_cache() -> None:
    """UsageError unless TORCHINDUCTOR_CACHE_DIR, when set, is or can become a folder: torch
    creates it when torchvision is imported (by any engine), and a failed first import makes
    every later one fail with an unrelated error."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = (error.strerror or type(error).__name__).lower()
        raise UsageError(
            f"TORCHINDUCTOR_CACHE_DIR {path} cannot be a folder ({reason}); point it at a "
            "folder or unset it."
        ) from None


# (the name after "SOURCE:", or the built-in backbone's own name) -> its record
Builder = Callable[[str], Backbone]
_BUILDERS: dict[str, Builder] = {}  # "vgg16" (a built-in) or "timm:" (a source) -> builder


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    """A decorator registering `builder` as what makes the backbone `name`, like timm's and
    torchvision's `register_model`.

    A name ending in a colon is a source: `@register_backbone("timm:")` makes every backbone
    `timm:ARCH` as `builder("ARCH")`. Any other name is one built-in backbone, made as
    `builder(name)`. The record's `name` is set to the name it was asked for by.
    """

    def register(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"a backbone is already registered as {name!r}.")
        _BUILDERS[name] = builder
        return builder

    return register


def available_backbones() -> list[str]:
    """Names of the built-in backbones (any model of a source is also available as
    `SOURCE:NAME`, see `available_sources`)."""
    return sorted(name for name in _BUILDERS if not name.endswith(":"))


def available_sources() -> list[str]:
    """The sources, each naming its models as `SOURCE:NAME` (`timm`, `torchvision`)."""
    return sorted(name.removesuffix(":") for name in _BUILDERS if name.endswith(":"))


def backbone_help() -> str:
    """The help of a backbone option: a built-in name, or `SOURCE:NAME` naming the sources."""
    sources = ", ".join(available_sources())
    return (
        f"Backbone name (see `featx backbones`), or SOURCE:NAME for any model of a source "
        f"({sources})."
    )


def get_backbone(name: str) -> Backbone:
    """The registry record for a backbone name; UsageError naming close matches otherwise."""
    source, colon, architecture = name.partition(":")
    if name in _BUILDERS and not colon:
        return replace(_BUILDERS[name](name), name=name)
    if colon and f"{source}:" in _BUILDERS:
        return replace(_BUILDERS[f"{source}:"](architecture), name=name)
    close = difflib.get_close_matches(name, available_backbones(), n=5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    sources = " or ".join(f"any {s} model as {s}:NAME" for s in available_sources())
    raise UsageError(
        f"unknown backbone {name!r}; {hint}built in: {', '.join(available_backbones())}, "
        f"or {sources}."
    )
