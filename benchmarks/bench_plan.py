"""Planning cost: listing, ordering and fingerprinting a dataset, and planning one shard of it,
before any image is decoded.

    python benchmarks/bench_plan.py --rows 100000 300000 1000000   # minutes on 2 loaded cores

For each size, writes that many 1-byte `.jpg` files as DATA/train/CLASS/ and the equivalent
CSV manifest, then times, each in a fresh process (so no pass warms the next's memory):

- the whole manifest planned as one process: read, checked, ordered, fingerprinted (the
  sha256 of its bytes), work items made, with featx's manifest cache empty;
- the same, with every file stat()ed as a one-process store's /files table needs;
- shard 0 of 1000 (of 10 for the reference size): read, ordered, fingerprinted, its own work
  items made and its own files stat()ed, as `featx extract --shard` does before decoding:
  first with the cache empty (the first shard to read the manifest), then with the manifest
  in the cache (every later shard on a machine sharing featx's cache).

Prints seconds, microseconds per row, the ratio to the smallest size per row (1.0 is linear),
and how much more a 1/1000 shard of the largest manifest costs than a 1/10 shard of the
reference manifest (--reference rows, 10,000 by default), cold and cached.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_export import cpu_model  # the benchmarks folder is the script's own

PLAN = """
import gc, json, sys, time
start = time.perf_counter()
from featx.data.manifest import open_dataset
from featx.extraction.plan import Work
imported = time.perf_counter()
manifest, shard, stat_all = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
folder = open_dataset(manifest)
work = Work.plan(folder, 0, tuple(shard) if shard else None)
folder.fingerprint
first, n = (work.shard["first_file"], work.shard["n_files"]) if shard else (0, len(folder.files))
if shard or stat_all:
    files = folder.files[first : first + n]
end = time.perf_counter()
print(json.dumps({"seconds": end - imported, "items": len(work.items)}))
"""


def make_tree(root: Path, n_files: int, n_classes: int) -> Path:
    """n_files 1-byte images under root/train/CLASS/ and their manifest."""
    manifest = root / "manifest.csv"
    for c in range(n_classes):
        (root / "train" / f"class{c:04d}").mkdir(parents=True, exist_ok=True)
    lines = ["path,label,split"]
    for i in range(n_files):
        name = f"class{i % n_classes:04d}"
        rel = f"train/{name}/img-{i:07d}.jpg"
        fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"\xff")
        os.close(fd)
        lines.append(f"{rel},{name},train")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def timed(
    manifest: Path, shard: tuple[int, int] | None, stat_all: bool = False, cached: bool = False
) -> float:
    """Seconds to plan in a fresh process; featx's cache emptied first unless `cached`."""
    cache = manifest.parent / "featx-cache"
    if not cached:
        shutil.rmtree(cache, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-c", PLAN, str(manifest), json.dumps(shard), "1" if stat_all else "0"],
        capture_output=True, text=True, check=True, env={**os.environ, "FEATX_CACHE": str(cache)},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def measure(rows: int, classes: int, repeats: int, shards: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_tree(Path(tmp), rows, min(classes, rows))
        shard = (0, shards)
        return {
            "whole": median([timed(manifest, None) for _ in range(repeats)]),
            "whole+stat": median([timed(manifest, None, True) for _ in range(repeats)]),
            "shard": median([timed(manifest, shard) for _ in range(repeats)]),
            "cached": median([timed(manifest, shard, cached=True) for _ in range(repeats)]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rows", "--files", type=int, nargs="+", default=[100_000, 300_000, 1_000_000]
    )
    parser.add_argument("--reference", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.reference = min(args.reference, *args.rows)  # tiny runs stay tiny
    reference = measure(args.reference, args.classes, args.repeats, 10)
    results = {}
    for rows in args.rows:  # each size printed when measured: removing a tree takes minutes
        results[rows] = measure(rows, args.classes, args.repeats, min(1000, rows))
        print(f"{rows} rows: {json.dumps(results[rows])}", flush=True)
    print(f"\nreference: 1/10 shard of {args.reference} rows plans in {reference['shard']:.2f} s "
          f"(first), {reference['cached']:.2f} s (cached)")  # fmt: skip
    print("\n| CSV manifest rows | whole s | us/row | linear | whole+stat s | 1/1000 shard s, "
          "first | 1/1000 shard s, cached |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    smallest = min(results)
    base = results[smallest]["whole"] / smallest
    for rows, r in sorted(results.items()):
        per_row = r["whole"] / rows
        print(f"| {rows} | {r['whole']:.2f} | {per_row * 1e6:.2f} | {per_row / base:.2f} | "
              f"{r['whole+stat']:.2f} | {r['shard']:.2f} | {r['cached']:.2f} |")  # fmt: skip
    print(f"\nCPU: {cpu_model()}; load average {os.getloadavg()[0]:.1f}")
    largest = max(results)
    for what in ("shard", "cached"):
        extra = results[largest][what] - reference[what]
        print(f"\n{'cached' if what == 'cached' else 'first'}: a 1/1000 shard of {largest} rows "
              f"costs {extra:+.2f} s more than a 1/10 shard of {args.reference} rows.")  # fmt: skip


if __name__ == "__main__":
    main()
