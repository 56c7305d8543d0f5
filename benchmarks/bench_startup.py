"""Start-up: how long the commands that need no network take as fresh processes (help,
listings, `info STORE`, a usage error, a re-run whose layers are all cached), against
importing torch, torchvision and timm. Medians of N interleaved runs.

    python benchmarks/bench_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FEATX = [sys.executable, "-m", "featx.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="featx-startup-"))
    try:
        rng = np.random.default_rng(0)
        for name in ("cat", "dog"):
            (work / "pets" / name).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(work / "pets" / name / f"{i}.jpg")
        extract = [
            *FEATX, "extract", "pets", "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--layer", "layer2", "--pool", "avg", "--store", "s.h5",
        ]  # fmt: skip
        subprocess.run([*extract, "--workers", "0", "--quiet"], cwd=work, check=True)
        commands = {
            "featx --help": [*FEATX, "--help"],
            "featx backbones": [*FEATX, "backbones"],
            "featx classifiers": [*FEATX, "classifiers"],
            "featx info STORE": [*FEATX, "info", "s.h5"],
            "a usage error (missing data folder)": [*FEATX, "extract", "nope", "--layer", "x"],
            "a cached re-run": extract,
            "import torch, torchvision, timm": [
                sys.executable, "-c", "import torch, torchvision, timm"
            ],
        }  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                start = time.perf_counter()
                subprocess.run(command, cwd=work, capture_output=True)
                times[name].append(time.perf_counter() - start)
        print(f"medians of {args.repeats} interleaved fresh processes")
        print("| command | median | range |")
        print("|---|---:|---:|")
        for name, values in times.items():
            print(
                f"| {name} | {statistics.median(values):.2f} s | "
                f"{min(values):.2f}-{max(values):.2f} s |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
