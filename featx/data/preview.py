"""`featx augment-preview`: a contact sheet of augmented views, so settings can be seen."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from featx.data.augment import AugmentConfig, preview_grid
from featx.data.folders import BadImage, load_image, scan_image_folder
from featx.errors import UsageError

__all__ = ["augment_preview", "preview_sources", "read_preview_settings"]

PNG_KEY = "featx-augment"  # PNG text chunk holding the settings as JSON


def preview_sources(path: str | os.PathLike, count: int, seed: int) -> list[Path]:
    """`path` itself when it is a file; else `count` images of the image folder, seeded, one
    class after another so that every class shows up before any repeats."""
    path = Path(path)
    if path.is_file():
        return [path]
    if count < 1:
        raise UsageError(f"--images must be at least 1, not {count}.")
    folder = scan_image_folder(path)
    rng = np.random.default_rng(seed)
    queues = []
    for label in range(len(folder.class_names)):
        members = [f.path for f in folder.files if f.label == label]
        queues.append([members[i] for i in rng.permutation(len(members))])
    chosen: list[Path] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(folder.root / queue.pop(0))
    return chosen


def augment_preview(
    source: str | os.PathLike,
    config: AugmentConfig | None = None,
    *,
    out: str | os.PathLike = "preview.png",
    n: int = 9,
    images: int = 4,
    seed: int = 0,
    tile: int = 160,
) -> Path:
    """Write a PNG grid: each chosen image followed by `n` augmented views (one image: a
    square-ish grid). The settings, seed and sources are stored in the PNG's text chunk
    `featx-augment`."""
    config = config or AugmentConfig()
    if tile < 16:
        raise UsageError(f"--tile must be at least 16 pixels, not {tile}.")
    paths = preview_sources(source, images, seed)
    pictures = []
    for p in paths:
        try:
            # a tile shows no more than this: a large JPEG is decoded at a reduced size
            pictures.append(load_image(p, draft=2 * tile))
        except BadImage as bad:
            raise UsageError(f"cannot preview {p}: {bad}.") from None
    sheet = preview_grid(pictures, config, n=n, seed=seed, tile=tile)
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file, not {out}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = PngImagePlugin.PngInfo()
    record = {
        "config": config.to_dict(),
        "seed": seed,
        "views": n,
        "images": [str(p) for p in paths],
    }
    text.add_text(PNG_KEY, json.dumps(record))
    sheet.save(out, pnginfo=text)
    return out


def read_preview_settings(path: str | os.PathLike) -> dict:
    """The settings a preview PNG was made with."""
    with Image.open(path) as image:
        return json.loads(image.text[PNG_KEY])
