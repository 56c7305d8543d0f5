"""The transfer-learning ladder on the project's Fashion-MNIST example: frozen features with
logistic regression, a head trained on the cached features, and fine-tuning, each scored on
the test split, with its wall-clock time.

    python benchmarks/bench_ladder.py --work /tmp/ladder

Builds WORK/fashion (100 train / 50 test images per class, no validation folder: runs hold out
20% of the training images) with examples/make_dataset.py, extracts EfficientNet-Lite0
(offline ImageNet weights, 96 px) layers into one store, then runs every rung through the
`featx` command line. Extra arguments after `--` go to the fine-tuning run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEATX = [sys.executable, "-m", "featx.cli"]
NETWORK = ["--backbone", "efficientnet_lite0", "--image-size", "96"]


def run(*args: object, cwd: Path) -> tuple[str, float]:
    """Run featx ARGS in `cwd`; (stdout, seconds). Stops the benchmark if it fails."""
    started = time.perf_counter()
    done = subprocess.run([*FEATX, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"featx {' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")
    return done.stdout, seconds


def make_fashion(data: Path, train_per_class: int, test_per_class: int) -> None:
    """The Fashion-MNIST example folder without its validation split (runs hold out 20%)."""
    if data.is_dir():
        return
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_dataset.py"), str(data),
         "--train-per-class", str(train_per_class), "--per-class", str(test_per_class)],
        check=True,
    )  # fmt: skip
    shutil.rmtree(data / "validation")


def test_accuracy(evaluate_output: str) -> float:
    return float(re.search(r"^\s*accuracy\s+([0-9.]+)", evaluate_output, re.M).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("ladder"))
    parser.add_argument("--layers", nargs="+", default=["blocks.5", "blocks.6", "forward_features"])
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("finetune_args", nargs="*", help="after --: extra finetune options")
    args = parser.parse_args()
    work = args.work.resolve()
    data = work / "fashion"
    make_fashion(data, args.train_per_class, args.test_per_class)
    store = work / "fashion.h5"
    layers = [a for layer in args.layers for a in ("--layer", layer)]
    _, extract_s = run("extract", data, *NETWORK, *layers, "--pool", "avg", "--store", store,
                       cwd=work)  # fmt: skip
    rows = [("extract, one pass (an existing store is reused)", None, extract_s)]
    for layer in args.layers:
        model = work / f"logreg-{layer}.joblib"
        _, fit_s = run("fit", "--store", store, "--layer", f"{layer}@avg", "--clf", "logreg",
                       "--model", model, cwd=work)  # fmt: skip
        out, eval_s = run("evaluate", "--model", model, "--store", store, "--split", "test",
                          cwd=work)  # fmt: skip
        rows.append((f"frozen {layer}@avg + logreg", test_accuracy(out), fit_s + eval_s))
    rungs = (
        ("head only, from the store", "head", ["--epochs", "0"]),
        ("fine-tuned (defaults), head from the store", "finetuned", args.finetune_args),
    )
    for name, folder, extra in rungs:
        out_dir = work / folder
        _, seconds = run("finetune", data, *NETWORK, "--store", store, "--out", out_dir,
                         "--overwrite", "--quiet", *extra, cwd=work)  # fmt: skip
        metrics = json.loads((out_dir / "metrics.json").read_text())
        layer = json.loads((out_dir / "config.json").read_text())["config"]["layer"]
        rows.append((f"{name} (head on {layer})", metrics["test"]["accuracy"], seconds))
    print("| rung | test accuracy | seconds |\n|---|---:|---:|")
    for name, accuracy, seconds in rows:
        shown = "" if accuracy is None else f"{accuracy:.3f}"
        print(f"| {name} | {shown} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
