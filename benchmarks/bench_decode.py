"""Reduced-size JPEG decoding (`Preprocessing.load` with `decode="reduced"`, PIL's
`Image.draft` inside `featx.data.folders.load_image`) against full decoding, on photo-sized
JPEGs: images/s of decode + resize + crop + normalise, and how close EfficientNet-Lite0's
features (its real offline weights; a random-init network's cosine says nothing) stay to the
full decode's, as cosine per image. `--factors` also measures drafting to other multiples K of
the resize target than featx's DRAFT_FACTOR, through the same `load_image`.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode.py --images 16 --repeats 5 --factors 1 2 4
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featx.backbones import get_backbone
from featx.backbones.layers import prepare_tap
from featx.data.folders import load_image
from featx.data.preprocessing import DRAFT_FACTOR, Preprocessing

SIZES = ((1600, 1200), (4000, 3000), (640, 480))


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


def drafted(prep: Preprocessing, factor: int, path: Path) -> torch.Tensor:
    """The network input with JPEGs drafted to `factor` x the resize target: featx's own
    `prep.load` for its DRAFT_FACTOR, the same `load_image` with another draft size else."""
    if factor == DRAFT_FACTOR:
        return prep(prep.with_decode("reduced").load(path))
    return prep(load_image(path, draft=factor * prep.resize))


def rate(fn, paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        fn(path)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="JPEGs per size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--factors", type=int, nargs="+", default=[DRAFT_FACTOR])
    args = parser.parse_args()
    torch.set_num_threads(1)  # decoding runs in one DataLoader worker per core
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  PIL {Image.__version__}, torch {torch.__version__}")
    print(f"{args.images} JPEGs per size, quality 90; medians of {args.repeats} interleaved runs")

    record = get_backbone("efficientnet_lite0")
    loaded = record.load("default")
    prep = loaded.preprocessing.with_decode("full")
    module = record.module_path("forward_features")
    tap = prepare_tap(loaded.model, [module], "avg", torch.device("cpu"), prep.input_size)
    print(f"efficientnet_lite0 (default weights), {prep.describe().split(', normalise')[0]}")
    print(f"featx's reduced decoding: DRAFT_FACTOR = {DRAFT_FACTOR}")

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return tap(x.contiguous(memory_format=torch.channels_last))[module].flatten(1)

    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            paths = make_jpegs(Path(tmp), args.images, size)
            print(f"\n== {size[0]}x{size[1]} JPEG ==")
            ways = {"full": lambda p: prep(prep.load(p))}
            for k in args.factors:
                ways[f"K={k}"] = functools.partial(drafted, prep, k)
            rates: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(args.repeats):  # interleaved: the machine's load hits every way alike
                for name, fn in ways.items():
                    rates[name].append(rate(fn, paths))
            full_rate = statistics.median(rates["full"])
            reference = torch.stack([ways["full"](p) for p in paths])
            reference_features = features(reference)
            print(f"full decode        {full_rate:6.1f} img/s")
            for k in args.factors:
                with Image.open(paths[0]) as probe:
                    if min(probe.size) >= 2 * k * prep.resize:
                        probe.draft(probe.mode, (k * prep.resize,) * 2)
                    decoded = probe.size
                x = torch.stack([ways[f"K={k}"](p) for p in paths])
                cos = torch.nn.functional.cosine_similarity(features(x), reference_features, dim=1)
                r = statistics.median(rates[f"K={k}"])
                pixel = (x - reference).abs().mean().item()
                print(
                    f"draft K={k} to {decoded[0]}x{decoded[1]}: {r:6.1f} img/s "
                    f"({r / full_rate:.2f}x full); mean |input diff| {pixel:.4f}; feature "
                    f"cosine min {cos.min().item():.5f} median {cos.median().item():.5f}"
                )


if __name__ == "__main__":
    main()
