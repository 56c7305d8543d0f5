"""What the Ray engine costs on one machine: `featx extract --ray local --shards 2` against
one ordinary `featx extract` process using the same cores.

    python benchmarks/bench_ray.py --images 320 --repeats 1     # about 5 minutes on 2 idle cores

Writes --images photo-sized JPEGs (as bench_extract.py), then runs, alternating, the two
commands in fresh processes (ResNet-50, random weights, `avgpool` at 224, batch 16, float32):
one process with the default decoding worker and all cores for torch; two Ray shard tasks of
one CPU each, decoding in-process, then the merge. Also times starting and stopping a local
Ray instance alone. Prints median wall seconds, images/s and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_extract import make_photos

FEATX = [sys.executable, "-m", "featx.cli"]
RAY_START = (
    "import ray, logging; ray.init(num_cpus=2, include_dashboard=False, "
    "logging_level=logging.ERROR, log_to_driver=False); ray.shutdown()"
)


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    print(f"{seconds:8.1f} s  {' '.join(command[3:])}", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbone", default="resnet50")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_photos(work / "data", args.images)
        common = [*FEATX, "extract", str(work / "data"), "--backbone", args.backbone,
                  "--weights", "none", "--layer", "avgpool", "--batch-size", "16", "--quiet",
                  "--overwrite"]  # fmt: skip
        runs: dict[str, list[float]] = {"one process": [], "ray, 2 shards": [], "ray start": []}
        for _ in range(args.repeats):
            runs["one process"].append(timed([*common, "--store", str(work / "one.h5")]))
            (work / "one.h5").unlink()
            ray = [*common, "--store", str(work / "ray.h5"), "--ray", "local", "--shards", "2"]
            runs["ray, 2 shards"].append(timed(ray))
            (work / "ray.h5").unlink()
            runs["ray start"].append(timed([sys.executable, "-c", RAY_START]))
    one = statistics.median(runs["one process"])
    print(f"\n| {args.backbone} avgpool 224, {args.images} images | median s | images/s | ratio |")
    print("|---|---:|---:|---:|")
    for name in ("one process", "ray, 2 shards"):
        median = statistics.median(runs[name])
        print(f"| {name} | {median:.1f} | {args.images / median:.1f} | {one / median:.2f}x |")
    start = statistics.median(runs["ray start"])
    ray_work = statistics.median(runs["ray, 2 shards"]) - start
    print(f"| ray, 2 shards, less Ray start-up ({start:.1f} s) | {ray_work:.1f} | "
          f"{args.images / ray_work:.1f} | {one / ray_work:.2f}x |")  # fmt: skip
    print(f"\nall runs: {runs}")


if __name__ == "__main__":
    main()
