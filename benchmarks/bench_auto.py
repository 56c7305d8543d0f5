"""`--engine auto` against each engine named, end to end, on the same images.

Each run is a fresh `featx extract` process over the same photo-sized JPEGs (ResNet-50
avgpool at 224 px, random weights: the speed is the same as with trained ones), timed from
start to exit. For each of auto, eager, compile and openvino, its own featx cache: one round
with every cache empty (what a first run costs: conversion, compilation, or auto's measuring),
then `--warm-runs` rounds on the caches they left (median); the engines take turns within
each round, in the reverse order every other round, so a change of load hits them alike.
Prints images/s, auto's choice line and its ratio to the best named engine, with the CPU's
model and flags and the load average.

    python benchmarks/bench_auto.py                  # 320 images, fp32
    python benchmarks/bench_auto.py --precision bf16
    python benchmarks/bench_auto.py --tiny           # a few seconds: 24 small images, resnet18
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from featx.inference.machine import cpu_description

FEATX = [sys.executable, "-m", "featx.cli"]


def photos(root: Path, n: int, size: tuple[int, int]) -> Path:
    """`n` JPEGs of `size` in two class folders: crops of scikit-image's sample photos."""
    import skimage.data

    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    rng = np.random.default_rng(0)
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        top, left = rng.integers(0, h // 4), rng.integers(0, w // 4)
        crop = Image.fromarray(src[top : top + 3 * h // 4, left : left + 3 * w // 4])
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        crop.resize(size).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def run(data: Path, engine: str, cache: Path, out: Path, args) -> tuple[float, str]:
    """Seconds of one `featx extract` process, and auto's choice line."""
    cmd = [*FEATX, "extract", str(data), "--backbone", args.backbone, "--layer", args.layer,
           "--weights", "none", "--engine", engine, "--precision", args.precision,
           "--store", str(out), "--overwrite"]  # fmt: skip
    if args.image_size:
        cmd += ["--image-size", str(args.image_size)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "FEATX_CACHE": str(cache)},
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{engine} failed:\n{done.stderr[-2000:]}")
    choice = [ln for ln in done.stderr.splitlines() if ln.startswith("Engine ")]
    return seconds, choice[-1] if choice else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--layer", default="avgpool")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--engines", nargs="+", default=["eager", "compile", "openvino"])
    parser.add_argument("--warm-runs", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="24 small images, resnet18 layer2")
    args = parser.parse_args()
    size = (640, 480)
    if args.tiny:
        args.images, args.backbone, args.layer, args.image_size = 24, "resnet18", "layer2", 64
        args.engines, args.warm_runs, size = ["eager", "openvino"], 1, (80, 60)
    cpu = cpu_description()
    units = " ".join(f for f in cpu["flags"] if f.startswith(("avx", "amx", "fma", "f16c")))
    print(f"# {cpu['model']}, {cpu['logical']} logical cores; flags: {units}")
    print(f"# {args.images} JPEGs {size[0]}x{size[1]}, {args.backbone} {args.layer}, "
          f"{args.precision}; load average before: {os.getloadavg()[0]:.1f}")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-auto-"))
    engines = ["auto", *args.engines]
    try:
        data = photos(work / "data", args.images, size)
        seconds: dict[str, list[float]] = {engine: [] for engine in engines}
        for round_ in range(1 + args.warm_runs):
            kind = "fresh" if round_ == 0 else f"warm {round_}"
            # warm rounds alternate the order, so no engine always runs first
            for engine in engines if round_ % 2 == 0 else engines[::-1]:
                took, choice = run(data, engine, work / f"cache-{engine}", work / "s.h5", args)
                seconds[engine].append(took)
                print(f"{kind:<7} {engine:<9} {args.images / took:6.2f} img/s  {choice}",
                      flush=True)  # fmt: skip
        rates = {
            engine: {
                "fresh": args.images / times[0],
                "warm": args.images / statistics.median(times[1:]),
            }
            for engine, times in seconds.items()
        }
        print(f"# load average: {os.getloadavg()[0]:.1f}")
        for engine, r in rates.items():
            print(f"{engine:<9} fresh {r['fresh']:6.2f} img/s   warm {r['warm']:6.2f} img/s "
                  f"(median of {args.warm_runs})")  # fmt: skip
        for kind in ("warm", "fresh"):
            best = max(args.engines, key=lambda e: rates[e][kind])
            ratio = rates["auto"][kind] / rates[best][kind]
            print(f"auto / best named ({best}), {kind} cache: {ratio:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
