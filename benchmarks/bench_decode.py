"""Reduced-size JPEG decoding (`decode_reduced` below, PIL's `Image.draft`) against
full decoding, on photo-sized JPEGs: images/s of decode + resize + crop + normalise, and how
close the backbone's features stay (cosine per image against the full decode).

    python benchmarks/bench_decode.py --images 24 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from featx.backbones import Preprocessing, get_backbone
from featx.backbones.layers import prepare_tap
from featx.data.folders import load_image

SIZES = ((1600, 1200), (640, 480))


def decode_reduced(path: str | os.PathLike, target_size: int) -> Image.Image:
    """Decode `path` as RGB with EXIF orientation applied, at the smallest JPEG scale whose
    sides are both still at least `target_size` (the later resize's shorter side, or square
    side). Non-JPEGs, and JPEGs smaller than twice `target_size` on their shorter side, decode
    at full size."""
    with Image.open(path) as image:
        if image.format == "JPEG" and 2 * target_size <= min(image.size):
            # draft keeps both sides >= the requested size, so no detail the resize would keep
            # is lost; it works on the still-undecoded file only.
            image.draft("RGB", (target_size, target_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def make_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """`n` JPEGs of `size` (quality 90) cut from scikit-image's photos, scaled up to cover."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    width, height = size
    paths = []
    for i in range(n):
        photo = Image.fromarray(photos[i % len(photos)])
        scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.2)
        photo = photo.resize(
            (int(photo.width * scale) + 1, int(photo.height * scale) + 1),
            Image.Resampling.BICUBIC,
        )
        x = int(rng.integers(0, photo.width - width + 1))
        y = int(rng.integers(0, photo.height - height + 1))
        path = folder / f"{width}x{height}-{i:03d}.jpg"
        photo.crop((x, y, x + width, y + height)).save(path, quality=90)
        paths.append(path)
    return paths


def full(path: Path, prep: Preprocessing) -> torch.Tensor:
    return prep(load_image(path))


def draft(path: Path, prep: Preprocessing) -> torch.Tensor:
    return prep(decode_reduced(path, prep.resize))


def rate(fn, paths: list[Path], prep: Preprocessing) -> float:
    start = time.perf_counter()
    for path in paths:
        fn(path, prep)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="JPEGs per size")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # decoding runs in one DataLoader worker per core
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  PIL {Image.__version__}, torch {torch.__version__}")
    print(f"{args.images} JPEGs per size, quality 90; medians of {args.repeats} interleaved runs")

    models = []
    for name, weights in (("resnet50", "none"), ("efficientnet_lite0", "default")):
        record = get_backbone(name)
        loaded = record.load(weights)
        prep = loaded.preprocessing
        module = "avgpool" if name == "resnet50" else "forward_features"
        module = record.module_path(module)
        tap = prepare_tap(loaded.model, [module], "avg", torch.device("cpu"), prep.input_size)
        models.append((f"{name} ({weights} weights)", prep, tap, module))

    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            paths = make_jpegs(Path(tmp), args.images, size)
            with Image.open(paths[0]) as probe:
                reduced = decode_reduced(paths[0], models[0][1].resize).size
                print(f"\n== {size[0]}x{size[1]} ({probe.format}); draft decodes to {reduced} "
                      f"for resize {models[0][1].resize} ==")  # fmt: skip
            for label, prep, tap, module in models:
                rates: dict[str, list[float]] = {"full": [], "draft": []}
                for _ in range(args.repeats):
                    rates["full"].append(rate(full, paths, prep))
                    rates["draft"].append(rate(draft, paths, prep))
                a = torch.stack([full(p, prep) for p in paths])
                b = torch.stack([draft(p, prep) for p in paths])
                pixel = (a - b).abs().mean().item()
                with torch.inference_mode():
                    fa = tap(a.contiguous(memory_format=torch.channels_last))[module]
                    fb = tap(b.contiguous(memory_format=torch.channels_last))[module]
                cos = torch.nn.functional.cosine_similarity(fa.flatten(1), fb.flatten(1), dim=1)
                rf, rd = statistics.median(rates["full"]), statistics.median(rates["draft"])
                print(
                    f"{label:<36} {prep.describe().split(',')[0]}: full {rf:6.1f} img/s, "
                    f"draft {rd:6.1f} img/s ({rd / rf:.2f}x); mean |input diff| {pixel:.4f}; "
                    f"feature cosine min {cos.min().item():.5f} median {cos.median().item():.5f}"
                )


if __name__ == "__main__":
    main()
