"""Export throughput: `featx export` of a synthetic store's layer as npy and as parquet.

    python benchmarks/bench_export.py --mb 400 --features 512    # a minute on 2 loaded cores

Writes a store of --mb megabytes of float32 features (bench_fit's synthetic store), then times
each format's export in a fresh process, --repeats times, and prints rows/s, MB/s of features
and the peak memory (VmHWM) of the exporting process, with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_fit import synthetic_store  # noqa: E402

CHILD = """
import json, sys, time
from featx.store.export import export

start = time.perf_counter()
result = export(sys.argv[1], sys.argv[2], "feat", sys.argv[3], overwrite=True)
seconds = time.perf_counter() - start
peak = 0
with open("/proc/self/status") as fh:
    for line in fh:
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
print(json.dumps({"seconds": seconds, "rows": result.n_rows, "dim": result.dim,
                  "bytes": result.nbytes, "peak": peak}))
"""


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def run(store: Path, out: Path, fmt: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), str(out), fmt],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp) / "s.h5", args.mb, args.features)
        print(f"{cpu_model()}; load average {os.getloadavg()[0]:.1f}")
        print("\n| format | rows | dim | median s | rows/s | MB/s of features | peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
        for fmt in ("npy", "parquet"):
            runs = sorted(
                (run(store, Path(tmp) / fmt, fmt) for _ in range(args.repeats)),
                key=lambda r: r["seconds"],
            )
            r = runs[len(runs) // 2]
            mb = r["rows"] * r["dim"] * 4 / 1e6
            print(f"| {fmt} | {r['rows']} | {r['dim']} | {r['seconds']:.2f} | "
                  f"{r['rows'] / r['seconds']:.0f} | {mb / r['seconds']:.0f} | "
                  f"{r['peak'] / 1e6:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
