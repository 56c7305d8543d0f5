"""Peak memory of an extraction whose features are larger than what it may hold.

Extracts VGG16 `block4_pool` at 224 (401 kB of float32 per image) for N images with
`featx extract` in a subprocess, and samples the resident memory of that process and of its
DataLoader workers (PSS, so shared pages are not counted twice) every 0.1 s.

    python benchmarks/bench_memory.py --images 2000
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    for i in range(n):
        target = folder / f"class{i % 4}"
        target.mkdir(parents=True, exist_ok=True)
        image = np.roll(base, shift=(i * 7) % 300, axis=0)
        Image.fromarray(image).save(target / f"{i:05d}.jpg", quality=85)


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """(resident bytes of the main process, PSS bytes of it and its children)."""
    try:
        main = process.memory_info().rss
        total = process.memory_full_info().pss
        for child in process.children(recursive=True):
            try:
                total += child.memory_full_info().pss
            except psutil.Error:
                pass
        return main, total
    except psutil.Error:
        return 0, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--layer", default="block4_pool")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="featx-mem-"))
    try:
        make_images(work / "data", args.images)
        command = [
            sys.executable,
            "-m",
            "featx.cli",
            "extract",
            str(work / "data"),
            "--backbone",
            args.backbone,
            "--layer",
            args.layer,
            "--weights",
            "none",
            "--precision",
            args.precision,
            "--store",
            str(work / "s.h5"),
            "--quiet",
        ]
        start = time.perf_counter()
        process = subprocess.Popen(command)
        watched = psutil.Process(process.pid)
        peak_main = peak_tree = 0
        while process.poll() is None:
            main_rss, tree_pss = tree_memory(watched)
            peak_main, peak_tree = max(peak_main, main_rss), max(peak_tree, tree_pss)
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        if process.returncode:
            raise SystemExit(f"featx extract failed with exit code {process.returncode}")
        store_bytes = (work / "s.h5").stat().st_size
        print(
            f"{args.backbone} {args.layer} at 224, {args.images} images, {args.precision}: "
            f"{seconds:.0f} s ({args.images / seconds:.1f} images/s)"
        )
        print(
            f"store: {store_bytes / 1e9:.2f} GB; peak resident: main process "
            f"{peak_main / 1e9:.2f} GB, main + workers (PSS) {peak_tree / 1e9:.2f} GB"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
