"""torchvision's classification models: any of them as `torchvision:NAME`, and the built-in
backbones, each one `builtin(...)` line below."""

from __future__ import annotations

import difflib
import functools
import re
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from featx.backbones.registry import Backbone, Weights, register_backbone
from featx.backbones.weights import reachable
from featx.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from featx.errors import UsageError, WeightsUnavailable

if TYPE_CHECKING:
    from torch import nn

__all__ = ["builtin", "keras_vgg_aliases", "torchvision_backbone"]

# What torchvision's builders change in the architecture when given weights (the rest of what
# they do, loading the file, `Backbone.load` does lazily).
PRETRAINED_KWARGS = {
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False}
}


@register_backbone("torchvision:")
def torchvision_backbone(
    architecture: str, default: Weights | None = None, aliases: Mapping[str, str] | None = None
) -> Backbone:
    """The record of torchvision's classification model `architecture`."""
    if default is None:
        _check_model(architecture)
    return Backbone(
        architecture,
        "torchvision",
        architecture,
        functools.partial(_architecture, architecture, False),
        functools.partial(_weights, architecture),
        default,
        dict(aliases or {}),
    )


def builtin(
    name: str,
    weights: str,
    resize: int,
    crop: int,
    interpolation: str = "bilinear",
    aliases: Mapping[str, str] | None = None,
) -> None:
    """Make torchvision's model `name` a built-in backbone whose default `weights`
    (`ENUM.MEMBER`) and their preprocessing (`resize`, `crop`, `interpolation`, ImageNet mean
    and std) are known without importing torch."""
    enum, _, member = weights.partition(".")
    default = Weights(
        f"torchvision:{enum}.{member}",
        Preprocessing(resize, crop, IMAGENET_MEAN, IMAGENET_STD, interpolation),
        functools.partial(_architecture, name, True),
        functools.partial(_file, name, member),
        _densenet_names if name.startswith("densenet") else None,
    )
    build = functools.partial(torchvision_backbone, default=default, aliases=aliases)
    register_backbone(name)(build)


def keras_vgg_aliases(convs_per_block: tuple[int, ...]) -> dict[str, str]:
    """Keras names (`block4_pool`) for torchvision VGG `features` indices. Keras' conv layers
    include their ReLU, so `blockB_convC` is the ReLU after the conv."""
    aliases, index = {}, 0
    for block, convs in enumerate(convs_per_block, start=1):
        for conv in range(1, convs + 1):
            aliases[f"block{block}_conv{conv}"] = f"features.{index + 1}"
            index += 2
        aliases[f"block{block}_pool"] = f"features.{index}"
        index += 1
    return aliases


def _check_model(architecture: str) -> None:
    import torchvision

    models = torchvision.models.list_models(module=torchvision.models)
    if architecture not in models:
        close = difflib.get_close_matches(architecture, models, n=5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UsageError(f"torchvision has no classification model {architecture!r}.{hint}")


def _architecture(architecture: str, pretrained: bool) -> nn.Module:
    """The model, as torchvision's builder shapes it for pretrained weights when `pretrained`."""
    import torchvision

    kwargs = PRETRAINED_KWARGS.get(architecture, {}) if pretrained else {}
    return torchvision.models.get_model(architecture, **kwargs)


def _weights(architecture: str, weights: str) -> Weights:
    enum = _enum(architecture, weights)
    t = enum.transforms()
    preprocessing = Preprocessing(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
    )
    return Weights(
        f"torchvision:{type(enum).__name__}.{enum.name}",
        preprocessing,
        functools.partial(_architecture, architecture, True),
        functools.partial(_file, architecture, enum.name),
        _densenet_names if architecture.startswith("densenet") else None,
    )


def _enum(architecture: str, weights: str):
    import torchvision

    enum_cls = torchvision.models.get_model_weights(architecture)
    if weights == "default":
        return enum_cls.DEFAULT
    name = weights.split(".")[-1]
    try:
        return enum_cls[name]
    except KeyError:
        valid = ", ".join(m.name for m in enum_cls)
        raise UsageError(
            f"{architecture} has no weights named {weights!r}; choose one of: {valid}, "
            "default, none, or a .pth/.safetensors file."
        ) from None


def _file(architecture: str, weights: str) -> Path:
    """The weights file in torch's cache, downloaded there when it is not."""
    import torch

    enum = _enum(architecture, weights)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache / Path(urlparse(enum.url).path).name
    unavailable = WeightsUnavailable(
        f"the {type(enum).__name__}.{enum.name} weights for {architecture} are not in the "
        f"torch cache {cache} and cannot be downloaded; copy {path.name} there, "
        "or pass --weights FILE with a local state dict."
    )
    if path.exists():
        return path
    if not reachable(enum.url):
        raise unavailable
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(enum.url, str(path), match.group(1) if match else None)
    except (urllib.error.URLError, OSError, RuntimeError):
        raise unavailable from None
    return path


# torchvision's DenseNet files use the names of an older release (`norm.1`, not `norm1`);
# torchvision renames them the same way when it loads them.
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _densenet_names(file_keys: list[str], model_keys: list[str]) -> list[str]:
    return [_DENSENET_LEGACY.sub(r"\1\2", key) for key in file_keys]


# The built-in backbones: one line each.
KERAS_VGG16, KERAS_VGG19 = keras_vgg_aliases((2, 2, 3, 3, 3)), keras_vgg_aliases((2, 2, 4, 4, 4))
# fmt: off
builtin("vgg16", "VGG16_Weights.IMAGENET1K_V1", 256, 224, aliases=KERAS_VGG16)
builtin("vgg19", "VGG19_Weights.IMAGENET1K_V1", 256, 224, aliases=KERAS_VGG19)
builtin("resnet18", "ResNet18_Weights.IMAGENET1K_V1", 256, 224)
builtin("resnet34", "ResNet34_Weights.IMAGENET1K_V1", 256, 224)
builtin("resnet50", "ResNet50_Weights.IMAGENET1K_V2", 232, 224)
builtin("resnet101", "ResNet101_Weights.IMAGENET1K_V2", 232, 224)
builtin("resnet152", "ResNet152_Weights.IMAGENET1K_V2", 232, 224)
builtin("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V2", 232, 224)
builtin("mobilenet_v3_small", "MobileNet_V3_Small_Weights.IMAGENET1K_V1", 256, 224)
builtin("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2", 232, 224)
builtin("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", 256, 224, "bicubic")
builtin("efficientnet_b1", "EfficientNet_B1_Weights.IMAGENET1K_V2", 255, 240)
builtin("efficientnet_b2", "EfficientNet_B2_Weights.IMAGENET1K_V1", 288, 288, "bicubic")
builtin("efficientnet_b3", "EfficientNet_B3_Weights.IMAGENET1K_V1", 320, 300, "bicubic")
builtin("densenet121", "DenseNet121_Weights.IMAGENET1K_V1", 256, 224)
builtin("densenet169", "DenseNet169_Weights.IMAGENET1K_V1", 256, 224)
builtin("inception_v3", "Inception_V3_Weights.IMAGENET1K_V1", 342, 299)
builtin("convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", 236, 224)
# fmt: on
