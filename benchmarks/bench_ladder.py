"""The transfer-learning ladder on Fashion-MNIST, judged across splits: the best frozen probe,
a head trained on the cached features, and fine-tuning with the defaults, each scored on the
test split of several independently drawn splits, as mean ± std over the splits.

    python benchmarks/bench_ladder.py --work /tmp/ladder --splits 1 2 3 --jobs 2

Each split SEED is its own image folder (examples/make_dataset.py --seed SEED: 100 train /
50 test images per class drawn at other indices for each seed, no validation folder, so every
run holds out 20% of the training images) and its own store of EfficientNet-Lite0 layers
(offline ImageNet weights, 96 px) in WORK/stores. Every rung runs through the `featx` command
line: `probe --save-best` (every stored layer, C chosen on validation, refit on all labelled
rows; the rung is the layer validation chose), `finetune --store --epochs 0` (stage 1 only)
and `finetune --store` (the defaults, `--refit all`). The fine-tuned rung also reports the
network validation chose before its retraining on train + validation. `--jobs` runs splits
side by side, each `featx` process with `--threads` torch threads. Extra arguments after `--`
go to both fine-tuning runs. The report of every store's log is written to WORK/ladder.html.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEATX = [sys.executable, "-m", "featx.cli"]
NETWORK = ["--backbone", "efficientnet_lite0", "--image-size", "96"]
LAYERS = ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "forward_features"]
RUNGS = ("best frozen probe", "head on the cache", "fine-tuned (defaults)")
CHOSEN = "fine-tuned, network validation chose (no retraining)"
SMOKE = {
    "train_per_class": 5, "test_per_class": 2, "image_size": 32, "splits": [1, 2],
    "layers": ["blocks.5", "forward_features"], "finetune_args": ["--epochs", "1"],
}  # fmt: skip


def run(*args: object, cwd: Path, threads: int = 1) -> tuple[str, float]:
    """Run featx ARGS in `cwd` with `threads` torch threads; (stdout, seconds). Stops the
    benchmark if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(
        [*FEATX, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"featx {' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")
    return done.stdout, seconds


def make_fashion(data: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> None:
    """The Fashion-MNIST example folder of split `seed` without its validation split (runs
    hold out 20% of the training images)."""
    if data.is_dir():
        return
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_dataset.py"), str(data),
         "--train-per-class", str(train_per_class), "--per-class", str(test_per_class),
         "--seed", str(seed)],
        check=True, capture_output=True,
    )  # fmt: skip
    shutil.rmtree(data / "validation")


def test_accuracy(evaluate_output: str) -> float:
    return float(re.search(r"^\s*accuracy\s+([0-9.]+)", evaluate_output, re.M).group(1))


def one_split(seed: int, args: argparse.Namespace) -> dict[str, object]:
    """Every rung on split `seed`: test accuracies, seconds, the probe's layer and size."""
    work = args.work / f"split-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "fashion"
    make_fashion(data, args.train_per_class, args.test_per_class, seed)
    store = args.work / "stores" / f"fashion-split{seed}.h5"
    store.parent.mkdir(exist_ok=True)
    network = ["--backbone", "efficientnet_lite0", "--image-size", str(args.image_size)]
    layers = [a for layer in args.layers for a in ("--layer", layer)]
    go = {"cwd": work, "threads": args.threads}
    _, extract_s = run("extract", data, *network, *layers, "--pool", "avg", "--store", store,
                       "--quiet", **go)  # fmt: skip
    _, probe_s = run("probe", "--store", store, "--save-best", work / "probe.featx",
                     "--report", work / "probe.json", "--quiet", **go)  # fmt: skip
    report = json.loads((work / "probe.json").read_text())
    best = next(r for r in report["layers"] if r["layer"] == report["best_layer"])
    found = {"seed": seed, "extract": extract_s, "probe layer": best["layer"],
             "n_test": best["test"]["n_samples"]}  # fmt: skip
    found[RUNGS[0]] = (best["test"]["accuracy"], probe_s)
    for rung, folder, extra in ((RUNGS[1], "head", ["--epochs", "0"]), (RUNGS[2], "tuned", [])):
        out = work / folder
        _, seconds = run("finetune", data, *network, "--store", store, "--out", out,
                         "--overwrite", "--quiet", *args.finetune_args, *extra, **go)  # fmt: skip
        metrics = json.loads((out / "metrics.json").read_text())
        found[rung] = (metrics["test"]["accuracy"], seconds)
        found[f"{rung} layer"] = json.loads((out / "config.json").read_text())["config"]["layer"]
        chosen = (metrics.get("refit") or {}).get("validation_chosen")
        if rung == RUNGS[2] and chosen:
            found[CHOSEN] = (chosen["test"]["accuracy"], None)
    print(f"split {seed} done: " + ", ".join(
        f"{r} {found[r][0]:.3f}" for r in (*RUNGS, CHOSEN) if r in found), flush=True)  # fmt: skip
    return found


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summary(splits: list[dict[str, object]]) -> None:
    """Per split, then per rung mean ± std over the splits, then the goal."""
    names = [r for r in (*RUNGS, CHOSEN) if all(r in s for s in splits)]
    print("\n| split | " + " | ".join(names) + " | fine-tuned − probe (points) | 1 SE |")
    print("|---|" + "---:|" * (len(names) + 2))
    gains, below = [], []
    for s in splits:
        probe = s[RUNGS[0]][0]
        se = 100 * math.sqrt(probe * (1 - probe) / s["n_test"])
        gain = 100 * (s[RUNGS[2]][0] - probe)
        gains.append(gain)
        below.append(gain < -se)
        cells = " | ".join(f"{s[n][0]:.3f}" for n in names)
        print(f"| {s['seed']} | {cells} | {gain:+.1f} | {se:.1f} |")
    print("\n| rung | test accuracy, mean ± std | seconds, mean | layer(s) |\n|---|---:|---:|---|")
    for n in names:
        seconds = [s[n][1] for s in splits if s[n][1] is not None]
        shown = f"{statistics.mean(seconds):.0f}" if seconds else ""
        layer = s_layers(splits, "probe layer" if n == RUNGS[0] else f"{n} layer")
        print(f"| {n} | {mean_std([s[n][0] for s in splits])} | {shown} | {layer} |")
    print(f"| extract (one pass per split) | | {statistics.mean(s['extract'] for s in splits):.0f}"
          " | |")  # fmt: skip
    wins, n = sum(g > 0 for g in gains), len(splits)
    sd = statistics.stdev(gains) if n > 1 else 0.0
    print(f"\nfine-tuned − best probe: {statistics.mean(gains):+.1f} ± {sd:.1f} points (mean ± "
          f"std over {n} splits); beats the probe on {wins} of {n}")  # fmt: skip
    held = statistics.mean(gains) >= 2
    print(f"goal, at least +2 points on average: {'met' if held else 'missed'}")
    print(f"goal, never below the probe by more than 1 SE: {'missed' if any(below) else 'met'}")


def s_layers(splits: list[dict[str, object]], key: str) -> str:
    """Each split's layer for `key`, or nothing when no split recorded one."""
    layers = [str(s[key]) for s in splits if s.get(key)]
    return ", ".join(layers) if len(layers) == len(splits) else ""


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with_lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    found = re.search(r"Model name:\s*(.+)", with_lscpu)
    return f"{found.group(1).strip() if found else model}, {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("ladder"))
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3],
                        help="seeds of the splits (the project's example is seed 0)")  # fmt: skip
    parser.add_argument("--layers", nargs="+", default=LAYERS)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--jobs", type=int, default=1, help="splits run side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per featx process")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, 2 splits, 1 epoch: checks that it runs")  # fmt: skip
    parser.add_argument("finetune_args", nargs="*", help="after --: extra finetune options")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    args.work = args.work.resolve()
    print(f"bench_ladder {datetime.date.today()}, {machine()}, {args.jobs} split(s) at a time, "
          f"{args.threads} torch thread(s) each; {args.train_per_class} train / "
          f"{args.test_per_class} test images per class at {args.image_size} px, splits "
          f"{args.splits}", flush=True)  # fmt: skip
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        splits = list(pool.map(lambda seed: one_split(seed, args), args.splits))
    summary(splits)
    stores = [a for s in args.splits for a in ("--store", args.work / "stores" /
                                               f"fashion-split{s}.h5")]  # fmt: skip
    run("report", args.work / "ladder.html", *stores, cwd=args.work, threads=1)
    print(f"\nreport: {args.work / 'ladder.html'}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
