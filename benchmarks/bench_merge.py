"""`featx merge` per GB: copying the shards' features into one store, against mapping them
with HDF5 virtual datasets (`--virtual`).

    python benchmarks/bench_merge.py --gb 1 --shards 4     # about a minute on the CI machine

Writes --shards synthetic shard stores (random float32 rows of VGG16 `block5_pool` size,
100 KB each, --gb in total; the store layout and shard metadata of `featx extract --shard`),
then merges them, alternating copy and virtual, --repeats times. Prints median seconds and
seconds per GB.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from featx.store.feature_store import add_layer, write_store
from featx.store.merge import merge

ROW_SHAPE = (512, 7, 7)


def write_shards(folder: Path, n_rows: int, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    bounds = [i * n_rows // count for i in range(count + 1)]
    files = {
        "path": np.array([f"c/{i:07d}.jpg" for i in range(n_rows)], dtype=object),
        "label": np.zeros(n_rows, np.int32),
        "split": np.array(["unsplit"] * n_rows, dtype=object),
        "size": np.ones(n_rows, np.int64),
        "mtime_ns": np.zeros(n_rows, np.int64),
    }
    paths = []
    for i in range(count):
        lo, hi = bounds[i], bounds[i + 1]
        meta = {
            "backbone": "vgg16",
            "weights_sha256": "0" * 64,
            "preprocessing": {},
            "augment": None,
            "dataset": {"root": "/data", "fingerprint": "f", "n_files": n_rows},
            "shard": {"index": i, "count": count, "first_row": lo, "n_rows": hi - lo,
                      "n_rows_total": n_rows, "first_file": lo, "n_files": hi - lo},
            "history": [],
        }  # fmt: skip
        rows = {k: files[k][lo:hi] for k in ("path", "label", "split")}
        rows |= {"source": np.arange(lo, hi), "view": np.zeros(hi - lo, np.int32)}
        path = folder / f"s.shard-{i}of{count}.h5"
        with write_store(path, meta, ["c"], files, rows, []) as out:
            blocks = (
                rng.standard_normal((min(500, hi - s), *ROW_SHAPE), dtype=np.float32)
                for s in range(lo, hi, 500)
            )
            add_layer(out, "block5_pool", hi - lo, ROW_SHAPE, "float32", "none", {}, blocks)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    row_bytes = int(np.prod(ROW_SHAPE)) * 4
    n_rows = int(args.gb * 1e9 // row_bytes)
    gb = n_rows * row_bytes / 1e9
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        folder = Path(tmp)
        shards = write_shards(folder, n_rows, args.shards)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for virtual in (False, True):
                start = time.perf_counter()
                merge(folder / f"merged-{virtual}.h5", shards, virtual=virtual)
                times[virtual].append(time.perf_counter() - start)
                (folder / f"merged-{virtual}.h5").unlink()
    print(f"\n| merge of {args.shards} shards, {gb:.2f} GB, {n_rows} rows | median s | s per GB |")
    print("|---|---:|---:|")
    for virtual, label in ((False, "copy"), (True, "--virtual")):
        median = statistics.median(times[virtual])
        print(f"| {label} | {median:.2f} | {median / gb:.2f} |")


if __name__ == "__main__":
    main()
