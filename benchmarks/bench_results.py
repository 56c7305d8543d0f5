"""Classifier quality: the best `featx fit` sweep (layers x classifiers,
a `+`-joined layer among them, refit on all labelled images) against the frozen logreg on the
last block, scored on the test split of Fashion-MNIST.

    python benchmarks/bench_results.py                  # several minutes on 2 busy CPU cores
    python benchmarks/bench_results.py --work /tmp/br   # keep (and reuse) the images and store
    python benchmarks/bench_results.py --train-per-class 4 --test-per-class 2 --image-size 32 \
        --cv 2                                          # a smoke run

1. Writes Fashion-MNIST (Debian's dataset-fashion-mnist; scikit-learn's digits without it,
   which `examples/make_dataset.py` says) as an image folder with
   --train-per-class training and --test-per-class test images per class (no validation
   split, so `fit` holds out 20% of the training images and `--refit all` is its default).
2. Extracts the candidate layers once with EfficientNet-Lite0's offline ImageNet weights at
   --image-size px: blocks.3 to bn2 average-pooled, blocks.3 to blocks.5 also avgmax-pooled
   (timed; layers already in the store are reused).
3. Fits logreg on the last block (blocks.6) and scores it on the test split (timed).
4. Runs the sweep (every layer, and `+` joins of the middle blocks, x logreg and svm with C in
   3, 10, 30), ranked by 5-fold cross-validation grouped by source image (`--cv 5`; a 20%
   hold-out is 400 images, too few to tell the leaders apart), then refits the best on every
   training image and scores it on the test split (timed). `--cv 0` ranks on the hold-out.

Prints a markdown table: what, test accuracy, seconds, and whether the best sweep reaches 0.87
on the test split.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2"]  # avg-pooled
AVGMAX_LAYERS = ["blocks.3", "blocks.4", "blocks.5"]
JOINED = [
    "blocks.4@avg+blocks.5@avg",
    "blocks.3@avg+blocks.4@avg+blocks.5@avg",
    "blocks.4@avgmax+blocks.5@avgmax",
    "blocks.3@avgmax+blocks.4@avgmax+blocks.5@avgmax",
]
CLASSIFIERS = ["logreg", "svm"]
GOAL = 0.87


def featx(*args: str) -> float:
    """Run `python -m featx.cli ARGS` (output shown) and return its wall-clock seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "featx.cli", *args], check=True)
    return time.perf_counter() - start


def make_data(data: Path, train: int, test: int) -> None:
    if data.is_dir():
        return
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "make_dataset.py"),
            str(data),
            "--dataset",
            "auto",
            "--train-per-class",
            str(train),
            "--per-class",
            str(test),
        ],
        check=True,
    )
    shutil.rmtree(data / "validation", ignore_errors=True)


def test_accuracy(model: Path, store: Path) -> float:
    from featx.classify.evaluation import evaluate

    return float(evaluate(model, store, "test", log=False).metrics["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--cv", type=int, default=5, help="folds to rank by (0: hold-out)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_results-"))
    work.mkdir(parents=True, exist_ok=True)
    data, store = work / "fashion", work / "fashion.h5"
    make_data(data, args.train_per_class, args.test_per_class)
    rows = []
    seconds = 0.0
    for pool, layers in (("avg", LAYERS), ("avgmax", AVGMAX_LAYERS)):
        layer_args = [a for layer in layers for a in ("--layer", layer)]
        seconds += featx(
            "extract", str(data), "--backbone", "efficientnet_lite0",
            "--image-size", str(args.image_size), "--pool", pool, *layer_args,
            "--store", str(store), "--workers", "0", "--quiet",
        )  # fmt: skip
    rows.append(("extract the candidate layers (reused when stored)", None, seconds))

    baseline = work / "baseline.featx"
    seconds = featx(
        "fit", "--store", str(store), "--layer", "blocks.6", "--clf", "logreg",
        "--model", str(baseline), "--quiet",
    )  # fmt: skip
    what = "frozen logreg on the last block (blocks.6)"
    rows.append((what, test_accuracy(baseline, store), seconds))

    best = work / "best.featx"
    candidates = [f"{layer}@avg" for layer in LAYERS]
    candidates += [f"{layer}@avgmax" for layer in AVGMAX_LAYERS] + JOINED
    layer_args = [a for layer in candidates for a in ("--layer", layer)]
    clf_args = [a for clf in CLASSIFIERS for a in ("--clf", clf)]
    ranking = ["--cv", str(args.cv)] if args.cv else []
    seconds = featx(
        "fit", "--store", str(store), *layer_args, *clf_args, "--param", "svm.C=3,10,30",
        *ranking, "--refit", "all", "--model", str(best), "--quiet",
    )  # fmt: skip
    from featx.models.file import load_model

    chosen = load_model(best).provenance
    ranked_by = f"{args.cv}-fold CV" if args.cv else "hold-out"
    what = (
        f"best of {len(candidates) * 4} by {ranked_by}: {chosen['classifier']} on "
        f"{chosen['layer']['key']}, refit on all"
    )
    rows.append((what, test_accuracy(best, store), seconds))

    print(
        f"\nFashion-MNIST {args.train_per_class}/{args.test_per_class} per class at "
        f"{args.image_size} px, EfficientNet-Lite0 (offline ImageNet weights)\n"
    )
    print("| what | test accuracy | seconds |\n|---|---:|---:|")
    for what, accuracy, seconds in rows:
        shown = "-" if accuracy is None else f"{accuracy:.4f}"
        print(f"| {what} | {shown} | {seconds:.0f} |")
    best_accuracy = rows[-1][1]
    verdict = "reached" if best_accuracy >= GOAL else "not reached"
    print(f"\nbest sweep >= {GOAL}: {verdict} ({best_accuracy:.4f})")


if __name__ == "__main__":
    main()
