"""Small image folders and configurations for the fine-tuning and augmentation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def shape_image(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A light shape of random colour, size and place on a random dark background."""
    background = tuple(int(v) for v in rng.integers(0, 110, 3))
    colour = tuple(int(v) for v in rng.integers(140, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = int(rng.integers(size // 6, size // 4))
    x, y = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
    if kind == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif kind == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    return image


def shapes_folder(root: Path, per_class: int | dict[str, int] = 10, seed: int = 0) -> Path:
    """ROOT/CLASS/*.png (`per_class` an int) or ROOT/SPLIT/CLASS/*.png (a dict of splits)."""
    rng = np.random.default_rng(seed)
    layout = {None: per_class} if isinstance(per_class, int) else per_class
    for split, n in layout.items():
        for kind in SHAPES:
            folder = root / kind if split is None else root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape_image(kind, rng).save(folder / f"{kind}-{i:03d}.png")
    return root


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `base.` entries of a Network state dict, prefix removed."""
    return {k.removeprefix("base."): v for k, v in state.items() if k.startswith("base.")}


def head_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Names whose tensors are not bit-for-bit equal."""
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k].cpu(), after[k].cpu())}
