"""What the feature cache buys: a classifier sweep on stored features against re-extracting
for every experiment, and the peak memory of a streamed (out-of-core) fit.

    python benchmarks/bench_fit.py                      # a few minutes on 2 CPU cores
    python benchmarks/bench_fit.py --per-class 60 --stream-mb 1000

1. Writes an image folder (Fashion-MNIST from /usr/share/datasets/fashion-mnist when present,
   else scikit-learn's digits), upscaled to 64 px, with train and validation splits.
2. Times one `featx extract` pass (EfficientNet-Lite0, two layers, avg-pooled).
3. Times `featx fit` with 6 classifiers x 2 layers on that store, and compares it with what
   the same 12 experiments cost when each one extracts its features again.
4. Writes a synthetic store of --stream-mb MB and fits `sgd` on it streamed and in memory, each
   in a fresh process, reporting peak resident memory and accuracy.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSIFIERS = ["logreg", "linearsvm", "svm", "knn", "rf", "ridge"]


def image_folder(root: Path, per_class: int) -> str:
    """ROOT/{train,validation}/CLASS/*.png with per_class training and per_class // 2
    validation images per class; returns the dataset's name."""
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():

        def idx(name: str) -> np.ndarray:
            with gzip.open(FASHION_MNIST / name) as fh:
                data = fh.read()
            dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
            return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)

        images, labels, name = (
            idx("train-images-idx3-ubyte.gz"),
            idx("train-labels-idx1-ubyte.gz"),
            "Fashion-MNIST",
        )
    else:
        from sklearn.datasets import load_digits

        X, labels = load_digits(return_X_y=True)
        images, name = (X * 255 / 16).astype(np.uint8).reshape(-1, 8, 8), "scikit-learn digits"
    start = 0
    for split, n in (("train", per_class), ("validation", per_class // 2)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == c)[start : start + n]:
                Image.fromarray(images[i]).resize((64, 64), Image.BILINEAR).save(
                    folder / f"{i:05d}.png"
                )
        start += n
    return name


def synthetic_store(path: Path, megabytes: int, n_features: int = 2048) -> Path:
    """A featx store with one float32 layer of 4 Gaussian classes (rows sorted by class, 80%
    train, 20% validation), written block by block."""
    from featx.data.preprocessing import Preprocessing
    from featx.store.feature_store import add_layer, write_store

    n_rows = max(1000, megabytes * 1_000_000 // (4 * n_features))
    rng = np.random.default_rng(0)
    means = np.zeros((4, n_features), np.float32)
    means[:, :64] = rng.normal(0, 0.3, (4, 64))
    labels = np.sort(np.arange(n_rows) % 4).astype(np.int32)
    split = np.where(rng.random(n_rows) < 0.8, "train", "validation")
    order = np.argsort(split == "validation", kind="stable")
    labels, split = labels[order], split[order].astype(object)
    paths = np.array([f"c{y}/{i:07d}.png" for i, y in enumerate(labels)], dtype=object)
    meta = {
        "backbone": "synthetic", "weights": "none", "weights_spec": "none",
        "weights_sha256": "0" * 64, "preprocessing_text": "synthetic",
        "preprocessing": Preprocessing(32, 32, (0.5,) * 3, (0.5,) * 3).to_dict(),
        "dataset": {"root": str(path.parent), "fingerprint": "0" * 64, "n_files": n_rows},
        "augment": None, "created": "", "versions": {}, "history": [],
    }  # fmt: skip
    zeros = np.zeros(n_rows, np.int64)
    rows = {"path": paths, "label": labels, "split": split, "source": np.arange(n_rows),
            "view": zeros.astype(np.int32)}  # fmt: skip
    files = {"path": paths, "label": labels, "split": split, "size": zeros, "mtime_ns": zeros}

    def blocks():
        for start in range(0, n_rows, 4096):
            y = labels[start : start + 4096]
            yield rng.standard_normal((len(y), n_features), dtype=np.float32) + means[y]

    attrs = {"layer": "feat", "module": "feat", "pool": "none", "precision": "fp32"}
    with write_store(path, meta, [f"c{i}" for i in range(4)], files, rows, []) as out:
        add_layer(out, "feat", n_rows, (n_features,), "float32", "none", attrs, blocks())
    return path


# VmHWM (peak RSS of this process image); ru_maxrss can carry the parent's peak over a fork
CHILD = """
import json, resource, sys, time
from featx.classify.fitting import fit

def peak():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

before, start = peak(), time.perf_counter()
sweep = fit(sys.argv[1], "feat", "sgd", stream=sys.argv[2] == "stream",
            chunk_bytes=int(sys.argv[3]), params={"max_iter": 10})
print(json.dumps({"before": before, "after": peak(), "seconds": time.perf_counter() - start,
                  "score": sweep.best.score, "passes": len(sweep.best.epochs)}))
"""


def measured_fit(store: Path, mode: str, chunk_bytes: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), mode, str(chunk_bytes)],
        stdout=subprocess.PIPE,  # its errors go to this process's stderr
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40, help="training images per class")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--layers", nargs=2, default=["blocks.5", "forward_features"])
    parser.add_argument("--stream-mb", type=int, default=400, help="synthetic store size")
    parser.add_argument("--chunk-mb", type=int, default=8)
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    args = parser.parse_args()

    import featx

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "images"
        dataset = image_folder(data, args.per_class)
        n_images = sum(1 for _ in data.rglob("*.png"))

        # one extraction pass (also what every experiment costs without the cache)
        store = work / "features.h5"
        start = time.perf_counter()
        featx.extract(
            data, args.backbone, args.layers, store=store, weights=args.weights,
            image_size=args.image_size, pool="avg", workers=0, quiet=True, overwrite=True,
        )  # fmt: skip
        extract_seconds = time.perf_counter() - start

        keys = [f"{layer}@avg" for layer in args.layers]
        start = time.perf_counter()
        sweep = featx.fit(store, keys, CLASSIFIERS, n_jobs=args.n_jobs)
        sweep_seconds = time.perf_counter() - start
        fits = sum(r.seconds for r in sweep.results)
        experiments = len(sweep.results)
        without_cache = experiments * extract_seconds + fits

        print(f"## Sweep on cached features ({dataset}, {n_images} images, {args.backbone} "
              f"weights={args.weights}, {args.image_size} px)\n")  # fmt: skip
        print("| | seconds |")
        print("|---|---:|")
        print(f"| one extraction pass ({len(args.layers)} layers) | {extract_seconds:.1f} |")
        print(
            f"| sweep: {len(CLASSIFIERS)} classifiers x {len(keys)} layers = {experiments} "
            f"experiments on the store | {sweep_seconds:.1f} |"
        )
        print(
            f"| the same {experiments} experiments re-extracting each time "
            f"({experiments} x {extract_seconds:.1f} s + {fits:.1f} s of fitting) | "
            f"{without_cache:.1f} |"
        )
        print(f"| speed-up | {without_cache / sweep_seconds:.0f}x |\n")
        print("| rank | layer | classifier | validation accuracy | fit s |")
        print("|---:|---|---|---:|---:|")
        for r in sweep.results:
            print(f"| {r.rank} | {r.layer} | {r.classifier} | {r.score:.3f} | {r.seconds:.2f} |")

        # streamed fit memory
        big = synthetic_store(work / "big.h5", args.stream_mb)
        size = big.stat().st_size
        chunk = args.chunk_mb << 20
        streamed = measured_fit(big, "stream", chunk)
        in_memory = measured_fit(big, "memory", chunk)
        print(f"\n## sgd on a {mb(size)} store (chunks of {args.chunk_mb} MiB), fresh processes\n")
        print(
            "| fit | peak RSS | RSS after imports | growth during fit | accuracy | passes | "
            "seconds |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in (("streamed", streamed), ("in memory", in_memory)):
            print(
                f"| {name} | {mb(r['after'])} | {mb(r['before'])} | "
                f"{mb(r['after'] - r['before'])} | {r['score']:.3f} | {r['passes'] or '-'} | "
                f"{r['seconds']:.1f} |"
            )


if __name__ == "__main__":
    main()
