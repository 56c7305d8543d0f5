"""Peak memory of `featx extract`, one or several featx checkouts interleaved.

Runs `featx extract` in a subprocess and samples, every 0.1 s, the peak resident memory of
that process (VmHWM: the kernel's own high-water mark) and the resident memory of it and its
DataLoader workers (PSS, so shared pages are not counted twice).

Features larger than memory may hold (VGG16 `block4_pool` at 224, 401 kB of float32 per image):

    python benchmarks/bench_memory.py --images 2000

Weights the requested layers never use (VGG16 `block5_pool` at 150 px, the layer of the Keras
transfer-learning notebook; `--weights random-file` saves a random-init torchvision state dict,
the same 528 MB as the real file), before and after a change, interleaved, three rounds:

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --images 200 --layer block5_pool \\
        --image-size 150 --weights random-file --rounds 3 \\
        --checkout before=/work/main --checkout after=.

Each checkout runs with PYTHONPATH set to it and its own FEATX_CACHE; with `--fresh-cache`
that cache is emptied before every run (a first run on a new weights file hashes the file).
`--load-only` runs only what extraction does before its first batch (load the backbone for the
layer, prepare the tap), to separate the weights' memory from the forward pass's.
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

import psutil
from bench_extract import make_photos


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """(peak resident bytes of the main process so far, PSS bytes of it and its children)."""
    try:
        with open(f"/proc/{process.pid}/status") as status:
            hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
        total = process.memory_full_info().pss
        for child in process.children(recursive=True):
            try:
                total += child.memory_full_info().pss
            except psutil.Error:
                pass
        return hwm, total
    except (psutil.Error, OSError, StopIteration):
        return 0, 0


def random_weights(backbone: str, path: Path) -> None:
    """A random-init torchvision state dict, the size of the pretrained file."""
    code = (
        "import sys, torch, torchvision; torch.manual_seed(0); "
        "torch.save(torchvision.models.get_model(sys.argv[1]).state_dict(), sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, backbone, str(path)], check=True)


# `--load-only`: what extraction does before its first batch, in any featx version: load the
# backbone for one layer (the whole model where `load` takes no layers) and prepare the tap.
LOAD_ONLY = """
import sys, torch
from featx.backbones.layers import prepare_tap
from featx.backbones.registry import get_backbone
record, size = get_backbone(sys.argv[1]), int(sys.argv[4])
module = record.module_path(sys.argv[2])
try:
    loaded = record.load(sys.argv[3], [module], size)
except TypeError:
    loaded = record.load(sys.argv[3])
prepare_tap(loaded.model, [module], "avg", torch.device("cpu"), size)
"""


def run_once(checkout: Path, cache: Path, command: list[str], fresh: bool) -> tuple[float, ...]:
    """(seconds, peak main RSS, peak PSS of main + workers) of one `featx extract`."""
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(checkout), "FEATX_CACHE": str(cache)}
    start = time.perf_counter()
    # cwd outside every checkout: `python -m` puts the cwd ahead of PYTHONPATH
    process = subprocess.Popen(command, env=env, cwd=cache.parent)
    watched = psutil.Process(process.pid)
    peak_main = peak_tree = 0
    while process.poll() is None:
        main_rss, tree_pss = tree_memory(watched)
        peak_main, peak_tree = max(peak_main, main_rss), max(peak_tree, tree_pss)
        time.sleep(0.1)
    if process.returncode:
        raise SystemExit(f"featx failed with exit code {process.returncode}")
    return time.perf_counter() - start, peak_main, peak_tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--layer", default="block4_pool")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weights", default="none", help="none, random-file, or a file")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, help="featx's default when not given")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--fresh-cache", action="store_true")
    parser.add_argument(
        "--load-only", action="store_true", help="only load the weights and prepare the tap"
    )
    parser.add_argument(
        "--checkout",
        action="append",
        default=[],
        help="LABEL=PATH of a featx checkout to run (repeat to interleave several)",
    )
    args = parser.parse_args()
    checkouts = [c.partition("=")[::2] for c in args.checkout] or [
        ("this", str(Path(__file__).resolve().parents[1]))
    ]

    work = Path(tempfile.mkdtemp(prefix="featx-mem-"))
    try:
        make_photos(work / "data", args.images)
        weights = args.weights
        if weights == "random-file":
            weights = str(work / f"{args.backbone}-random.pth")
            random_weights(args.backbone, Path(weights))
        command = [
            sys.executable, "-m", "featx.cli", "extract", str(work / "data"),
            "--backbone", args.backbone, "--layer", args.layer,
            "--image-size", str(args.image_size), "--weights", weights,
            "--precision", args.precision, "--store", str(work / "s.h5"), "--quiet",
        ]  # fmt: skip
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        if args.load_only:
            size = str(args.image_size)
            command = [sys.executable, "-c", LOAD_ONLY, args.backbone, args.layer, weights, size]
        print(
            f"{args.backbone} {args.layer} at {args.image_size}, {args.images} images, "
            f"{args.precision}, weights {args.weights}, batch size {args.batch_size or 'default'}"
            + (", featx cache emptied before every run" if args.fresh_cache else "")
            + (", loading only" if args.load_only else "")
        )
        results: dict[str, list[tuple[float, ...]]] = {label: [] for label, _ in checkouts}
        for round_ in range(args.rounds):
            order = checkouts[round_ % len(checkouts) :] + checkouts[: round_ % len(checkouts)]
            for label, path in order:
                (work / "s.h5").unlink(missing_ok=True)
                result = run_once(
                    Path(path).resolve(), work / f"cache-{label}", command, args.fresh_cache
                )
                results[label].append(result)
                seconds, main_rss, tree = result
                print(
                    f"  round {round_ + 1} {label:>8}: {seconds:5.1f} s "
                    f"({args.images / seconds:.1f} images/s), peak resident main "
                    f"{main_rss / 1e9:.2f} GB, main + workers (PSS) {tree / 1e9:.2f} GB",
                    flush=True,
                )
        for label, runs in results.items():
            seconds, main_rss, tree = (statistics.median(r[i] for r in runs) for i in range(3))
            print(
                f"median {label:>8}: {args.images / seconds:.1f} images/s, peak resident main "
                f"{main_rss / 1e9:.2f} GB, main + workers (PSS) {tree / 1e9:.2f} GB"
            )
        if (work / "s.h5").exists():
            print(f"store: {(work / 's.h5').stat().st_size / 1e9:.3f} GB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
