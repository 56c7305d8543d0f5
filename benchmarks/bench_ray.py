"""Static slices against dynamic work units on a local Ray instance, with and without one
slow worker.

    python benchmarks/bench_ray.py --images 256 --repeats 1    # about 10 minutes on 2 cores

Writes --images photo-sized JPEGs (as bench_extract.py), starts one local Ray instance with
--workers CPUs, and times whole jobs of --workers Ray workers of one CPU each (featx's own
actors and scheduler, `featx.extraction.units`, each job ending with the merge): "static"
cuts the rows into one unit per worker (the equal slices of one task per shard), "dynamic"
into 4 units per worker, handed to whichever worker is free. "one slow worker" makes one
worker run its network --slow times slower (it sleeps after each batch for --slow - 1 times
the batch's own time; only in this script). The network is --backbone with random weights,
`avgpool` at 224, batch 16, eager, decoding in the worker's process. Prints median wall
seconds, images/s, and each layout's ratio to static with the same workers.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from bench_export import cpu_model
from bench_extract import make_photos

from featx.extraction.settings import extract_settings
from featx.extraction.shard import shard_store_path
from featx.extraction.units import UnitWorker, run_units
from featx.store.merging import merge


class SlowWorker(UnitWorker):
    """A worker whose network runs `factor` times slower: a slow node."""

    def __init__(self, data, settings, threads, factor: float):
        super().__init__(data, settings, threads)
        from featx.backbones.tap import LayerTap

        forward = LayerTap.forward

        def slowed(tap, *args, **kwargs):
            start = time.perf_counter()
            out = forward(tap, *args, **kwargs)
            time.sleep((factor - 1) * (time.perf_counter() - start))
            return out

        LayerTap.forward = slowed


def job(ray, data: Path, store: Path, args, units: int, slow: bool) -> float:
    """Wall seconds of one job: the workers started, the units run, the shards merged."""
    settings = extract_settings(None, ["avgpool"], {
        "backbone": args.backbone, "weights": "none", "store": store, "batch_size": 16,
        "engine": "eager", "workers": 0, "quiet": True, "device": "cpu",
    })  # fmt: skip
    start = time.perf_counter()
    plain = ray.remote(UnitWorker).options(num_cpus=1)
    actors = [plain.remote(str(data), settings, 1) for _ in range(args.workers - slow)]
    if slow:
        actors.append(ray.remote(SlowWorker).options(num_cpus=1).remote(
            str(data), settings, 1, args.slow))  # fmt: skip
    run_units(ray, actors, range(units), units, lambda finished, running: None, 3)
    paths = [shard_store_path(store, (i, units)) for i in range(units)]
    merge(store, paths)
    seconds = time.perf_counter() - start
    for actor in actors:
        ray.kill(actor)
    for path in [store, *paths]:
        path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slow", type=float, default=3.0)
    parser.add_argument("--backbone", default="resnet18")
    args = parser.parse_args()
    import ray

    print(f"CPU: {cpu_model()}", flush=True)
    layouts = {"static": args.workers, "dynamic": 4 * args.workers}
    cases = [(layout, slow) for slow in (False, True) for layout in layouts]
    runs: dict[tuple[str, bool], list[float]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_photos(work / "data", args.images)
        started = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False)  # fmt: skip
        print(f"Ray start: {time.perf_counter() - started:.1f} s", flush=True)
        try:
            for _ in range(args.repeats):
                for layout, slow in cases:
                    units = min(layouts[layout], args.images)
                    seconds = job(ray, work / "data", work / "s.h5", args, units, slow)
                    runs[layout, slow].append(seconds)
                    print(f"{seconds:8.1f} s  {layout}, {units} units"
                          f"{', one slow worker' if slow else ''}", flush=True)  # fmt: skip
        finally:
            ray.shutdown()
    print(f"\n| {args.backbone} avgpool 224, {args.images} images, {args.workers} workers "
          f"| units | median s | images/s | vs static |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for layout, slow in cases:
        median = statistics.median(runs[layout, slow])
        static = statistics.median(runs["static", slow])
        name = f"{layout}{f', one worker {args.slow:g}x slower' if slow else ''}"
        print(f"| {name} | {min(layouts[layout], args.images)} | {median:.1f} | "
              f"{args.images / median:.1f} | {static / median:.2f}x |")  # fmt: skip
    named = {f"{layout}{'+slow' if slow else ''}": v for (layout, slow), v in runs.items()}
    print(f"\nall runs: {named}")


if __name__ == "__main__":
    main()
