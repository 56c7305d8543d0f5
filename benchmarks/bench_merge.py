"""`featx merge`: copying the shards' features into one store, against mapping them with HDF5
virtual datasets (`--virtual`), and how it scales with the number of shards.

    python benchmarks/bench_merge.py --shards 4 --rows 2500       # 1 GB, about a minute
    (ulimit -n 256; python benchmarks/bench_merge.py --tiny --shards 1000 --rows 100)
    python benchmarks/bench_merge.py --tiny                       # a smoke test, seconds

Writes --shards synthetic shard stores of --rows rows each (random float32 rows of VGG16
`block5_pool` size, 100 KB each; 64 floats with --tiny), with the layout and shard metadata
of `featx extract --shard`, then merges them, alternating copy and virtual, --repeats times.
Merge holds at most two files open whatever the number of shards, so a thousand shards merge
under `ulimit -n 256`. Prints median seconds, seconds per GB, the peak resident memory and the
open-file limit.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_export import cpu_model  # the benchmarks folder is the script's own

from featx.store.feature_store import add_layer, write_store
from featx.store.merging import merge

ROW_SHAPE = (512, 7, 7)
TINY_ROW_SHAPE = (64,)
PREPROCESSING = {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225]}  # fmt: skip


def write_shards(folder: Path, rows: int, count: int, row_shape: tuple[int, ...]) -> list[Path]:
    """`count` shard stores of `rows` rows each, as `featx extract --shard I/N` writes them."""
    rng = np.random.default_rng(0)
    n_rows = rows * count
    files = {
        "path": np.array([f"c/{i:07d}.jpg" for i in range(n_rows)], dtype=object),
        "label": np.zeros(n_rows, np.int32),
        "split": np.array(["unsplit"] * n_rows, dtype=object),
        "size": np.ones(n_rows, np.int64),
        "mtime_ns": np.zeros(n_rows, np.int64),
    }
    paths = []
    for i in range(count):
        lo, hi = i * rows, (i + 1) * rows
        meta = {
            "backbone": "vgg16", "weights": "none", "weights_sha256": "0" * 64,
            "preprocessing": PREPROCESSING, "augment": None,
            "dataset": {"root": "/data", "fingerprint": "f", "n_files": n_rows},
            "shard": {"index": i, "count": count, "first_row": lo, "n_rows": rows,
                      "n_rows_total": n_rows},
            "history": [],
        }  # fmt: skip
        own = {k: v[lo:hi] for k, v in files.items()}  # a shard holds its own files only
        columns = {k: own[k] for k in ("path", "label", "split")}
        columns |= {"source": np.arange(lo, hi), "view": np.zeros(rows, np.int32)}
        path = folder / f"s.shard-{i}of{count}.h5"
        with write_store(path, meta, ["c"], own, columns, []) as out:
            blocks = (
                rng.standard_normal((min(500, hi - s), *row_shape), dtype=np.float32)
                for s in range(lo, hi, 500)
            )
            add_layer(out, "block5_pool", rows, row_shape, "float32", "none", {}, blocks)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, help="default 4 (20 with --tiny)")
    parser.add_argument("--rows", type=int, help="rows per shard, default 2500 (10 with --tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="rows of 64 floats, merged once")
    args = parser.parse_args()
    row_shape = TINY_ROW_SHAPE if args.tiny else ROW_SHAPE
    args.shards = args.shards or (20 if args.tiny else 4)
    args.rows = args.rows or (10 if args.tiny else 2500)
    args.repeats = 1 if args.tiny else args.repeats
    n_rows = args.shards * args.rows
    gb = n_rows * int(np.prod(row_shape)) * 4 / 1e9
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        folder = Path(tmp)
        shards = write_shards(folder, args.rows, args.shards, row_shape)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for virtual in (False, True):
                out = folder / f"merged-{virtual}.h5"
                start = time.perf_counter()
                merge(out, shards, virtual=virtual)
                times[virtual].append(time.perf_counter() - start)
                out.unlink()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    print(f"\n| merge of {args.shards} shards, {gb:.3f} GB, {n_rows} rows | median s | s per GB |")
    print("|---|---:|---:|")
    for virtual, label in ((False, "copy"), (True, "--virtual")):
        median = statistics.median(times[virtual])
        print(f"| {label} | {median:.2f} | {median / max(gb, 1e-9):.2f} |")
    print(f"\nCPU: {cpu_model()}; load average {os.getloadavg()[0]:.1f}")
    print(f"\npeak resident memory {peak_mb:.0f} MB; open-file limit {limit}")


if __name__ == "__main__":
    main()
