"""Seeded random image augmentation: Keras-style geometric and photometric transforms.

Every random choice comes from a local generator seeded per call, so an augmented view depends
only on the image, the config and the seed: never on global RNG state, worker process or order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

from featx.errors import UsageError

__all__ = ["AugmentConfig", "AugmentParams", "Augmenter", "preview_grid", "view_seed"]

FILL_MODES = ("nearest", "constant", "reflect")
_PADDING_MODES = {"nearest": "border", "constant": "zeros", "reflect": "reflection"}

# name -> (lowest, highest, highest allowed, unit) for the range-valued fields.
_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "rotation": (0.0, 180.0, True, " degrees"),
    "shift": (0.0, 1.0, True, ""),
    "shear": (0.0, 1.0, True, ""),
    "zoom": (0.0, 1.0, False, ""),
    "crop": (0.0, 0.5, False, ""),
    "contrast": (0.0, 1.0, True, ""),
    "brightness": (0.0, 1.0, True, ""),
    "noise": (0.0, 1.0, True, ""),
    "downsample": (0.0, 7.0, True, ""),
}


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; defaults follow the classic Keras ImageDataGenerator recipe.

    - rotation: angle in degrees, uniform in [-rotation, rotation]; positive is counter-clockwise.
    - shift: translation as a fraction of width (x) and height (y), each uniform in [-shift, shift].
    - shear: horizontal shear factor k uniform in [-shear, shear] (x' = x + k*y), i.e. a shear
      angle of atan(k); 0.2 is about 11 degrees.
    - zoom: scale s uniform in [1 - zoom, 1 + zoom], same on both axes; s > 1 zooms in (objects
      grow by s, their area by s**2), s < 1 zooms out. (Keras uses the inverse convention.)
    - hflip, vflip: mirror left-right / top-bottom with probability 1/2.
    - crop: cut a random fraction in [0, crop] off each side, then resize back to the input size.
    - downsample: shrink by a random factor in [1, 1 + downsample], then resize back up.
    - brightness: multiply each channel by its own factor in [1 - brightness, 1 + brightness].
    - contrast: scale the distance to the mean grey level by a factor in [1 - contrast,
      1 + contrast].
    - noise: standard deviation of additive Gaussian noise, on the [0, 1] intensity scale.
    - fill: how geometric transforms fill pixels from outside the image: "nearest" (repeat the
      edge), "constant" (fill_value, 0-255, on every channel) or "reflect" (mirror at the edge).
    """

    rotation: float = 40.0
    shift: float = 0.2
    shear: float = 0.2
    zoom: float = 0.2
    hflip: bool = True
    vflip: bool = False
    crop: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    noise: float = 0.0
    downsample: float = 0.0
    fill: str = "nearest"
    fill_value: int = 0

    def __post_init__(self) -> None:
        for name, (low, high, high_ok, unit) in _RANGES.items():
            value = getattr(self, name)
            in_range = (
                _is_number(value) and low <= value and (value <= high if high_ok else value < high)
            )
            if not in_range:
                upper = f"{high:g}" if high_ok else f"just below {high:g}"
                raise UsageError(
                    f"Augmentation {name} must be a number from {low:g} to {upper}{unit}, "
                    f"got {value!r}."
                )
            object.__setattr__(self, name, float(value))
        for name in ("hflip", "vflip"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(
                    f"Augmentation {name} must be true or false, got {getattr(self, name)!r}."
                )
        if self.fill not in FILL_MODES:
            raise UsageError(
                f"Augmentation fill must be one of {', '.join(FILL_MODES)}, got {self.fill!r}."
            )
        if not (
            isinstance(self.fill_value, int)
            and not isinstance(self.fill_value, bool)
            and 0 <= self.fill_value <= 255
        ):
            raise UsageError(
                f"Augmentation fill_value must be a whole number from 0 to 255, "
                f"got {self.fill_value!r}."
            )

    @classmethod
    def none(cls) -> AugmentConfig:
        """The identity config: every transform off, images come back unchanged."""
        return cls(rotation=0.0, shift=0.0, shear=0.0, zoom=0.0, hflip=False)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON/TOML-compatible values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AugmentConfig:
        """Build a config from a mapping; missing fields keep their defaults."""
        valid = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(map(str, set(data) - set(valid)))
        if unknown:
            raise UsageError(
                f"Unknown augmentation setting(s) {', '.join(unknown)}; "
                f"valid keys are {', '.join(valid)}."
            )
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> AugmentConfig:
        """Read a config from a .toml, .json, .yaml or .yml file of top-level keys."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".toml", ".json", ".yaml", ".yml"):
            raise UsageError(
                f"Augmentation config {path} must be a .toml, .json, .yaml or .yml file."
            )
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"Cannot read augmentation config {path}: {exc.strerror}.") from exc
        try:
            data = _parse(text, suffix)
        except UsageError:
            raise
        except Exception as exc:  # each parser raises its own error type
            raise UsageError(f"Augmentation config {path} is not valid: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UsageError(f"Augmentation config {path} must hold a table of settings.")
        return cls.from_dict(data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse(text: str, suffix: str) -> Any:
    if suffix == ".json":
        return json.loads(text)
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError as exc:
            raise UsageError("Reading TOML needs Python 3.11 or newer; use JSON.") from exc
        return tomllib.loads(text)
    try:
        import yaml
    except ImportError as exc:
        raise UsageError("Reading YAML needs pyyaml installed; use TOML or JSON.") from exc
    return yaml.safe_load(text)


@dataclass(frozen=True)
class AugmentParams:
    """One random draw from an AugmentConfig, in the conventions documented there."""

    angle: float  # degrees, counter-clockwise
    shift: tuple[float, float]  # fractions of width and height; +x right, +y down
    shear: float  # factor
    scale: float  # > 1 enlarges
    hflip: bool
    vflip: bool
    crop: tuple[float, float, float, float]  # fractions cut off top, left, bottom, right
    downsample: float  # factor >= 1
    brightness: tuple[float, float, float]  # per-channel factors
    contrast: float
    noise_seed: int


def view_seed(base_seed: int, source_index: int, view: int) -> int:
    """A well-mixed 63-bit seed for augmented view `view` of source image `source_index`."""
    key = f"{base_seed}:{source_index}:{view}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class Augmenter:
    """Applies random augmentation to RGB images; `augmenter(image, seed)` is deterministic."""

    config: AugmentConfig

    def __call__(self, image: Image.Image, seed: int) -> Image.Image:
        """An augmented RGB copy of `image`, same size, fully determined by `seed`."""
        return self.apply(image, self.sample(seed))

    def sample(self, seed: int) -> AugmentParams:
        """Draw the random parameters for `seed`; each field uses a fixed draw whatever is on."""
        c = self.config
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(16, generator=g, dtype=torch.float64).tolist()

        def sym(x: float, r: float) -> float:  # uniform in [-r, r]
            return (2.0 * x - 1.0) * r

        return AugmentParams(
            angle=sym(u[0], c.rotation),
            shift=(sym(u[1], c.shift), sym(u[2], c.shift)),
            shear=sym(u[3], c.shear),
            scale=1.0 + sym(u[4], c.zoom),
            hflip=c.hflip and u[5] < 0.5,
            vflip=c.vflip and u[6] < 0.5,
            crop=(u[7] * c.crop, u[8] * c.crop, u[9] * c.crop, u[10] * c.crop),
            downsample=1.0 + u[11] * c.downsample,
            brightness=(
                1.0 + sym(u[12], c.brightness),
                1.0 + sym(u[13], c.brightness),
                1.0 + sym(u[14], c.brightness),
            ),
            contrast=1.0 + sym(u[15], c.contrast),
            noise_seed=int(torch.randint(2**62, (1,), generator=g)),
        )

    def apply(self, image: Image.Image, p: AugmentParams) -> Image.Image:
        """Apply drawn parameters: geometry, flips, crop, downsample, colour, noise."""
        x = TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
        height, width = x.shape[-2:]
        if p.angle or p.shift != (0.0, 0.0) or p.shear or p.scale != 1.0:
            x = self._warp(x, p)
        if p.hflip:
            x = TF.horizontal_flip(x)
        if p.vflip:
            x = TF.vertical_flip(x)
        if any(p.crop):
            top, left = round(p.crop[0] * height), round(p.crop[1] * width)
            bottom, right = round(p.crop[2] * height), round(p.crop[3] * width)
            size = [max(1, height - top - bottom), max(1, width - left - right)]
            x = TF.resized_crop(x, top, left, *size, [height, width], antialias=True)
        small = [max(1, round(height / p.downsample)), max(1, round(width / p.downsample))]
        if small != [height, width]:
            x = TF.resize(TF.resize(x, small, antialias=True), [height, width], antialias=True)
        if p.brightness != (1.0, 1.0, 1.0):
            x = x * torch.tensor(p.brightness, dtype=x.dtype)[:, None, None]
        if p.contrast != 1.0:
            mean = TF.rgb_to_grayscale(x).mean()
            x = (x - mean) * p.contrast + mean
        if self.config.noise:
            g = torch.Generator().manual_seed(p.noise_seed)
            x = x + torch.randn(x.shape, generator=g) * self.config.noise
        out = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        return TF.to_pil_image(out, mode="RGB")

    def _warp(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """One bilinear affine resampling for rotation, shear, zoom and shift about the centre."""
        height, width = x.shape[-2:]
        a = math.radians(p.angle)
        # Forward map in centred pixel coordinates with y down: rotation @ shear @ zoom.
        rotate = torch.tensor(
            [[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]], dtype=torch.float64
        )
        forward = rotate @ torch.tensor([[1.0, p.shear], [0.0, 1.0]], dtype=torch.float64)
        forward = forward * p.scale
        shift = torch.tensor([p.shift[0] * width, p.shift[1] * height], dtype=torch.float64)
        # affine_grid wants output -> input in normalised coordinates (pixel = normalised * size/2).
        half = torch.diag(torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64))
        inverse = torch.linalg.inv(forward)
        theta = torch.cat(
            [
                torch.linalg.inv(half) @ inverse @ half,
                (-torch.linalg.inv(half) @ inverse @ shift)[:, None],
            ],
            dim=1,
        )
        fill = self.config.fill
        batch = x[None]
        if fill == "constant":  # a coverage channel blends fill_value in at the borders
            batch = torch.cat([batch, torch.ones_like(batch[:, :1])], dim=1)
        grid = F.affine_grid(theta[None].float(), list(batch.shape), align_corners=False)
        out = F.grid_sample(
            batch, grid, mode="bilinear", padding_mode=_PADDING_MODES[fill], align_corners=False
        )[0]
        if fill == "constant":
            out = out[:3] + (1.0 - out[3:]) * (self.config.fill_value / 255.0)
        return out


def preview_grid(
    images: list[Image.Image],
    config: AugmentConfig,
    n: int = 9,
    seed: int = 0,
    tile: int = 160,
) -> Image.Image:
    """A contact sheet: each image's original followed by `n` augmented views.

    One image gives a square-ish grid of n + 1 tiles; several give one row per image. Tiles are
    `tile` pixels square with a 4-pixel gap, views use seeds `view_seed(seed, row, view)`.
    """
    if not images:
        raise UsageError("Preview needs at least one image.")
    if n < 0:
        raise UsageError(f"Preview needs a non-negative number of views, got {n}.")
    augmenter = Augmenter(config)
    tiles = [
        [image, *(augmenter(image, view_seed(seed, row, v)) for v in range(n))]
        for row, image in enumerate(images)
    ]
    if len(images) == 1:
        cols = math.ceil(math.sqrt(n + 1))
        tiles = [tiles[0][i : i + cols] for i in range(0, n + 1, cols)]
    cols = max(len(row) for row in tiles)
    gap = 4
    sheet = Image.new(
        "RGB", (cols * (tile + gap) + gap, len(tiles) * (tile + gap) + gap), (40, 40, 40)
    )
    for r, row in enumerate(tiles):
        for c, picture in enumerate(row):
            thumb = ImageOps.contain(picture.convert("RGB"), (tile, tile))
            x = gap + c * (tile + gap) + (tile - thumb.width) // 2
            y = gap + r * (tile + gap) + (tile - thumb.height) // 2
            sheet.paste(thumb, (x, y))
    return sheet
