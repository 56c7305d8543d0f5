"""Seeded random image augmentation: Keras-style geometric and photometric transforms.

Every random choice comes from a local generator seeded per call, so an augmented view depends
only on the image, the config and the seed: never on global RNG state, worker process or order.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

from featx.data.augment_config import AugmentConfig
from featx.errors import UsageError

__all__ = ["AugmentParams", "Augmenter", "preview_grid", "view_seed"]

_PADDING_MODES = {"nearest": "border", "constant": "zeros", "reflect": "reflection"}


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
