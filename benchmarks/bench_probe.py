"""The linear probe protocol (C over logspace(-6, 5, 45) chosen on validation, refit on
training + validation, scored on test) by `featx.probe`, against the same protocol written by
hand with scikit-learn, in one run; and the time of one C path on a large synthetic layer.

    python benchmarks/bench_probe.py                   # Fashion-MNIST, 2,000 images, 5 layers
    python benchmarks/bench_probe.py --tiny            # a smoke test (digits, 2 layers)
    python benchmarks/bench_probe.py --preconditioning # featx with and without it, same store
    python benchmarks/bench_probe.py --synthetic 100000x2048 --classes 1000

1. Writes an image folder with examples/make_dataset.py (Fashion-MNIST from
   /usr/share/datasets/fashion-mnist, else scikit-learn's digits): per class 120 training,
   40 validation and 40 test images (2,000 labelled images), and extracts five avg-pooled
   EfficientNet-Lite0 layers (the installed offline weights) at 96 px.
2. Times `featx.probe` on every layer, then a scikit-learn loop per layer (StandardScaler on
   the training rows, 45 LogisticRegression(lbfgs, max_iter=1000) fits scored on validation,
   the refit on training + validation at the best C, scored on test). Prints both times, their
   ratio and both best test accuracies.
3. `--preconditioning`: instead of step 2, `featx.probe` on the same store with the solver's
   eigenbasis change of variables and without it (in turns, twice each), per layer.
4. `--synthetic RxD`: a store of R rows x D float32 features (K Gaussian classes), probed with
   the linear protocol streamed from disk in row chunks (memory budget below the layer); prints
   the path's time, L-BFGS evaluations, and the time per evaluation projected to 1.28M rows
   (and 1,000 classes) on this CPU, and on one GPU from the path's floating-point operations.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["blocks.2", "blocks.3", "blocks.4", "blocks.5", "forward_features"]
IMAGENET_ROWS = 1_281_167
GPU_NAME = "NVIDIA A100, 19.5 TFLOP/s fp32 published peak"
GPU_FLOPS = 0.7 * 19.5e12  # assumed sustained: 70% of the published peak in these matmuls


def build_store(work: Path, tiny: bool) -> tuple[Path, list[str]]:
    data, store = work / "images", work / "probe.h5"
    counts = ["--train-per-class", "8", "--per-class", "4"] if tiny else [
        "--train-per-class", "120", "--per-class", "40"]  # fmt: skip
    extra = ["--dataset", "digits"] if tiny else []
    if not data.is_dir():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_dataset.py"), str(data),
                        *counts, *extra], check=True)  # fmt: skip
    import featx

    layers = LAYERS[-2:] if tiny else LAYERS
    start = time.perf_counter()
    featx.extract(
        data, "efficientnet_lite0", layers, store=store, pool="avg", image_size=64 if tiny else 96,
        workers=0, device="cpu", quiet=True,
    )  # fmt: skip
    print(f"extraction: {time.perf_counter() - start:.1f} s")
    return store, [f"{layer}@avg" for layer in layers]


def sklearn_protocol(store: Path, keys: list[str], Cs) -> dict[str, float]:
    """The protocol by hand: {layer: test accuracy}."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from featx.store.feature_store import FeatureStore

    out = {}
    with FeatureStore(store) as s, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        y = {split: s.labels(split) for split in ("train", "validation", "test")}
        for key in keys:
            start = time.perf_counter()
            X = {split: s.read(key, split).astype(np.float64) for split in y}
            scaler = StandardScaler().fit(X["train"])
            scores = []
            for C in Cs:
                clf = LogisticRegression(C=C, max_iter=1000).fit(
                    scaler.transform(X["train"]), y["train"]
                )
                scores.append(clf.score(scaler.transform(X["validation"]), y["validation"]))
            best = Cs[int(np.argmax(scores))]
            X_all = np.concatenate([X["train"], X["validation"]])
            y_all = np.concatenate([y["train"], y["validation"]])
            scaler = StandardScaler().fit(X_all)
            clf = LogisticRegression(C=best, max_iter=1000).fit(scaler.transform(X_all), y_all)
            out[key] = clf.score(scaler.transform(X["test"]), y["test"])
            print(f"scikit-learn {key}: {time.perf_counter() - start:.1f} s", flush=True)
    return out


def compare(work: Path, tiny: bool) -> None:
    import featx
    from featx.classify.probe_protocols import C_GRID

    store, keys = build_store(work, tiny)
    import sklearn.linear_model  # noqa: F401

    import featx.classify.probing  # noqa: F401  (imports are not part of either protocol)

    start = time.perf_counter()
    result = featx.probe(store, layers=keys, log=False, progress=lambda t: print(t, flush=True))
    ours = time.perf_counter() - start
    start = time.perf_counter()
    theirs = sklearn_protocol(store, keys, list(C_GRID))
    hand = time.perf_counter() - start
    print(result.table(), "\n")
    print("| layer | featx C | featx test acc | scikit-learn test acc | path evaluations |")
    print("|---|---:|---:|---:|---:|")
    for r in result.layers:
        evaluations = sum(p["evaluations"] for p in r.path)
        print(f"| {r.layer} | {r.chosen['C']:.3g} | {r.test['accuracy']:.4f} | "
              f"{theirs[r.layer]:.4f} | {evaluations} |")  # fmt: skip
    best_ours = max(r.test["accuracy"] for r in result.layers)
    print(f"\nfeatx.probe: {ours:.1f} s; scikit-learn loop: {hand:.1f} s; "
          f"ratio {hand / ours:.1f}x")  # fmt: skip
    print(f"best test accuracy: featx {best_ours:.4f}, scikit-learn {max(theirs.values()):.4f}")
    print(f"featx's pick by validation: {result.best.layer}, test "
          f"{result.best.test['accuracy']:.4f}")  # fmt: skip


def preconditioning(work: Path, tiny: bool) -> None:
    """featx.probe's per-layer seconds and evaluations with the preconditioner (its default
    rule) and without it, alternating, two runs each."""
    import featx
    import featx.classify.probe_solver as solver

    store, keys = build_store(work, tiny)
    default = solver.PRECONDITION_MAX_FEATURES
    for run, limit in enumerate([default, 0, default, 0]):
        solver.PRECONDITION_MAX_FEATURES = limit  # 0: every layer runs without it
        start = time.perf_counter()
        result = featx.probe(store, layers=keys, log=False)
        label = "with" if limit else "without"
        print(f"run {run + 1} {label:7s} {time.perf_counter() - start:6.1f} s  " + "  ".join(
            f"{r.layer} {r.seconds:.1f} s/{sum(p['evaluations'] for p in r.path)} ev/"
            f"test {r.test['accuracy']:.4f}" for r in result.layers), flush=True)  # fmt: skip
    solver.PRECONDITION_MAX_FEATURES = default


def synthetic_store(
    path: Path, n_rows: int, n_features: int, n_classes: int, progress: bool = False
) -> Path:
    """One float32 layer `feat` of Gaussian classes: 80% train, 10% validation, 10% test."""
    from featx.data.preprocessing import Preprocessing
    from featx.store.feature_store import add_layer, write_store

    rng = np.random.default_rng(0)
    means = rng.normal(0, 0.15, (n_classes, n_features)).astype(np.float32)
    labels = ((np.arange(n_rows) // 10) % n_classes).astype(np.int32)
    split = np.array(["train"] * 8 + ["validation", "test"], dtype=object)[np.arange(n_rows) % 10]
    order = np.lexsort((labels, split))
    labels, split = labels[order], split[order]
    paths = np.array([f"c{y}/{i:08d}.png" for i, y in enumerate(labels)], dtype=object)
    meta = {
        "backbone": "synthetic", "weights": "none", "weights_spec": "none",
        "weights_sha256": "0" * 64, "preprocessing_text": "synthetic",
        "preprocessing": Preprocessing(8, 8, (0.0,) * 3, (1.0,) * 3).to_dict(),
        "dataset": {"root": str(path.parent), "fingerprint": "0" * 64, "n_files": n_rows},
        "augment": None, "created": "", "versions": {}, "history": [],
    }  # fmt: skip
    zeros = np.zeros(n_rows, np.int64)
    rows = {"path": paths, "label": labels, "split": split, "source": np.arange(n_rows),
            "view": zeros.astype(np.int32)}  # fmt: skip
    files = {"path": paths, "label": labels, "split": split, "size": zeros, "mtime_ns": zeros}

    pool = rng.standard_normal((1 << 15, n_features), dtype=np.float32)

    def blocks():  # a shuffled slice of a pool of noise per block: fast to make, never all held
        for start in range(0, n_rows, 8192):
            y = labels[start : start + 8192]
            offset = int(rng.integers(0, len(pool) - 8192))
            yield pool[offset + rng.permutation(len(y))] + means[y]
            if progress and start // 8192 % 16 == 0:
                print(f"  writing rows {start:,} / {n_rows:,}", flush=True)

    attrs = {"layer": "feat", "module": "feat", "pool": "none", "precision": "fp32"}
    with write_store(path, meta, [f"c{i}" for i in range(n_classes)], files, rows, []) as out:
        add_layer(out, "feat", n_rows, (n_features,), "float32", "none", attrs, blocks())
    return path


def synthetic(work: Path, shape: str, n_classes: int, chunk_mb: int) -> None:
    import featx

    n_rows, n_features = (int(v) for v in shape.lower().split("x"))
    store = synthetic_store(work / "synthetic.h5", n_rows, n_features, n_classes)
    layer_bytes = n_rows * n_features * 4
    start = time.perf_counter()
    result = featx.probe(store, log=False, memory_budget=layer_bytes // 4,
                         chunk_bytes=chunk_mb << 20, max_iter=100)  # fmt: skip
    seconds = time.perf_counter() - start
    r = result.layers[0]
    evaluations = sum(p["evaluations"] for p in r.path)
    path_seconds = sum(p["seconds"] for p in r.path)
    n_train = int(n_rows * 0.8)
    per_eval = path_seconds / evaluations
    scale = (IMAGENET_ROWS / n_train) * (1000 / n_classes)
    flops = 4 * IMAGENET_ROWS * n_features * 1000  # logits and gradient per evaluation
    print(
        f"synthetic {n_rows} x {n_features}, {n_classes} classes, streamed "
        f"(memory for features {r.memory_bytes / 1e6:.0f} MB, chunks of {chunk_mb} MB)"
    )
    print(
        f"probe: {seconds:.1f} s in all; the 45-C path: {path_seconds:.1f} s, "
        f"{evaluations} loss+gradient evaluations ({per_eval:.3f} s each, at most 100 "
        "L-BFGS iterations per C)"
    )
    print(f"projected to {IMAGENET_ROWS:,} x {n_features}, 1000 classes, same evaluations on "
          f"this CPU: {per_eval * scale * evaluations / 3600:.1f} h "
          f"({per_eval * scale:.1f} s per evaluation)")  # fmt: skip
    print(f"projected on one GPU at {GPU_FLOPS / 1e12:.0f} TFLOP/s (features held in GPU memory, "
          f"{IMAGENET_ROWS * n_features * 4 / 1e9:.1f} GB): "
          f"{flops / GPU_FLOPS * evaluations / 60:.1f} min")  # fmt: skip
    print(f"validation accuracy at C={r.chosen['C']:.3g}: {r.validation['accuracy']:.4f}")


def rss_mb() -> float:
    """Resident memory of this process now, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale(work: Path, n_features: int, n_classes: int, chunk_mb: int, evaluations: int) -> None:
    """1,281,167 rows x `n_features` float32 in an HDF5 store, 80% of them training rows
    streamed in chunks: the time of one read pass and of one loss + gradient on a sample of
    chunks, both scaled to 1,281,167 rows, the memory held, and one 45-C path projected from
    `evaluations` on this CPU and on one GPU."""
    import torch

    from featx.classify.probe_data import LayerSource
    from featx.classify.probe_solver import LinearModel, objective
    from featx.store.feature_store import FeatureStore

    n_rows = IMAGENET_ROWS
    path = work / f"scale-{n_features}-{n_classes}.h5"
    start = time.perf_counter()
    if not path.exists():
        synthetic_store(path, n_rows, n_features, n_classes, progress=True)
    print(f"store: {n_rows:,} rows x {n_features} float32 "
          f"({path.stat().st_size / 1e9:.1f} GB), {time.perf_counter() - start:.0f} s")  # fmt: skip
    with FeatureStore(path) as store:
        train = np.flatnonzero(store.split_of_rows() == "train")
        source = LayerSource.open(
            store, "feat", {"train": train}, store.labels(), pool="avg", device=torch.device("cpu"),
            budget=1 << 20, chunk_bytes=chunk_mb << 20, stream=True,
        )  # fmt: skip
        before, start, sample, peak = rss_mb(), time.perf_counter(), [], 0.0
        for i, (X, y) in enumerate(source.chunks(("train",))):
            if len(sample) < 4:
                sample.append((X.clone(), y.clone(), None))
            peak = max(peak, rss_mb())
            if i % 20 == 0:
                print(f"  read pass: chunk {i}, {time.perf_counter() - start:.0f} s", flush=True)
        read = time.perf_counter() - start
        source.close()
    rows = sum(len(y) for _, y, _ in sample)
    X_all = torch.cat([X for X, _, _ in sample])
    mean, sd = X_all.mean(0), X_all.std(0)
    model = LinearModel(torch.zeros(n_features, n_classes), torch.zeros(n_classes), mean, sd)
    objective(lambda: sample[:1], model, 1.0, float(rows))  # warm-up
    start = time.perf_counter()
    objective(lambda: sample, model, 1.0, float(rows))
    compute = (time.perf_counter() - start) * n_rows / rows
    flops = 4.0 * n_rows * n_features * n_classes  # logits and gradient, per evaluation
    per_eval = read * n_rows / len(train) + compute
    print(f"read pass over the {len(train):,} training rows in {chunk_mb} MB chunks: {read:.0f} s "
          f"({len(train) * n_features * 4 / read / 1e6:.0f} MB/s); resident memory at most "
          f"{peak:.0f} MB during the pass ({before:.0f} MB before it)")  # fmt: skip
    print(f"per evaluation at {n_rows:,} rows (both scaled by rows): read "
          f"{read * n_rows / len(train):.0f} s + loss and gradient {compute:.0f} s")  # fmt: skip
    print(
        f"loss + gradient, {n_classes} classes, float32: timed on {rows:,} rows, "
        f"{flops / compute / 1e9:.0f} GFLOP/s"
    )
    print(f"one 45-C path at {evaluations} evaluations (assumed): "
          f"{per_eval * evaluations / 3600:.1f} h on this CPU, streamed")  # fmt: skip
    gpu = flops / GPU_FLOPS * evaluations
    print(
        f"on one GPU ({GPU_NAME}, {GPU_FLOPS / 1e12:.1f} TFLOP/s fp32 sustained assumed; the "
        f"{len(train) * n_features * 4 / 1e9:.1f} GB of features held in its memory): "
        f"{gpu / 60:.1f} min, {compute / (flops / GPU_FLOPS):.0f}x this CPU's compute"
    )


def cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                    if line.startswith("model name"))  # fmt: skip
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
        simd = [f for f in ("avx2", "avx512f", "amx_tile") if f in flags]
        return f"{name} ({', '.join(simd) or 'no avx2'})"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke test")
    parser.add_argument("--preconditioning", action="store_true",
                        help="featx with and without the solver's preconditioner")  # fmt: skip
    parser.add_argument("--synthetic", metavar="RxD", help="time one C path on RxD features")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="one C path at 1,281,167 x --features, streamed, projected",
    )
    parser.add_argument("--features", type=int, default=2048, help="--scale features")
    parser.add_argument(
        "--evaluations",
        type=int,
        default=1000,
        help="--scale: loss + gradient evaluations assumed for one 45-C path",
    )
    parser.add_argument(
        "--classes",
        type=int,
        default=None,
        help="synthetic classes (default 100; 1000 with --scale)",
    )
    parser.add_argument("--chunk-mb", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    import torch

    print(f"CPU: {cpu()}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.scale:
            scale(work, args.features, args.classes or 1000, args.chunk_mb, args.evaluations)
        elif args.preconditioning:
            preconditioning(work, args.tiny)
        elif args.synthetic:
            synthetic(work, args.synthetic, args.classes or 100, args.chunk_mb)
        else:
            compare(work, args.tiny)


if __name__ == "__main__":
    main()
