"""Quality of `--precision int8` on the project's real-data example, against fp32.

Fashion-MNIST (`examples/make_dataset.py`: 1,000 train, 300 validation, 300 test images) through
EfficientNet-Lite0 with its offline ImageNet weights at 96 px, layer blocks.5 avg-pooled:
extracts an fp32 store (eager) and an int8 store (OpenVINO, NNCF post-training quantization
calibrated on 300 training images chosen with seed 0), prints each image's feature cosine int8
vs fp32 (min, median), then fits `featx fit --clf logreg` on each store and prints its test
accuracy (`featx evaluate --split test`). The bound checked: cosine >= 0.99 for every image
and a logreg accuracy loss under 1 point.

    python benchmarks/bench_int8.py --work /tmp/int8-bench
    python benchmarks/bench_int8.py --work /tmp/int8-smoke --train-per-class 2 --per-class 1 \
        --repeats 1                                     # a smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from featx.store import FeatureStore

LAYER = "blocks.5"
KEY = f"{LAYER}@avg"
ROOT = Path(__file__).resolve().parent.parent


def featx(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "featx.cli", *args], cwd=cwd, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"featx {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for data and stores")
    parser.add_argument("--seed", type=int, default=0, help="int8 calibration seed")
    parser.add_argument("--repeats", type=int, default=7, help="model-only timing repeats")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=30, help="validation and test images")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEATX_CACHE", str(work / "cache"))
    if not (work / "data" / "fashion").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "make_dataset.py"), "data/fashion",
             "--train-per-class", str(args.train_per_class), "--per-class", str(args.per_class)],
            cwd=work, check=True,
        )  # fmt: skip
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {work / 'data' / 'fashion'}")
    common = ["data/fashion", "--backbone", "efficientnet_lite0", "--image-size", "96",
              "--layer", LAYER, "--pool", "avg"]  # fmt: skip
    featx("extract", *common, "--engine", "eager", "--store", "fp32.h5", cwd=work)
    featx("extract", *common, "--precision", "int8", "--seed", str(args.seed),
          "--store", "int8.h5", cwd=work)  # fmt: skip

    with FeatureStore(work / "fp32.h5") as a, FeatureStore(work / "int8.h5") as b:
        x, y = a.read(KEY), b.read(KEY)
        attrs = b.layer(KEY).attrs
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    print(f"int8 layer attributes: {attrs}")
    print(f"cosine int8 vs fp32 over {len(cos)} images: min {cos.min():.5f}, "
          f"median {np.median(cos):.5f}, below 0.99: {(cos < 0.99).sum()}")  # fmt: skip

    accuracy = {}
    for name in ("fp32", "int8"):
        featx("fit", "--store", f"{name}.h5", "--layer", KEY, "--clf", "logreg",
              "--model", f"{name}.featx", cwd=work)  # fmt: skip
        out = featx("evaluate", "--model", f"{name}.featx", "--store", f"{name}.h5",
                    "--split", "test", cwd=work)  # fmt: skip
        accuracy[name] = float(re.search(r"^\s*accuracy\s+([0-9.]+)", out, re.M).group(1))
        print(f"logreg test accuracy, {name} features: {accuracy[name]:.4f}")
    loss = 100 * (accuracy["fp32"] - accuracy["int8"])
    ok = cos.min() >= 0.99 and loss < 1
    print(f"accuracy loss {loss:+.2f} points; bound (cosine >= 0.99, loss < 1 point) "
          f"{'holds' if ok else 'does not hold'}")  # fmt: skip
    model_speed(work, str(attrs["calibration_engine_key"]), args.repeats)


def model_speed(work: Path, int8_key: str, repeats: int) -> None:
    """Model-only images/s of eager fp32, OpenVINO fp32 and the cached int8 model, on one batch
    of 32 real test images, interleaved (after the fits: OpenVINO's threads and forks clash)."""
    import statistics

    import torch

    from featx.backbones import get_backbone
    from featx.backbones.layers import prepare_tap
    from featx.data.folders import load_image
    from featx.data.manifest import open_dataset
    from featx.inference import build_engine

    record = get_backbone("efficientnet_lite0")
    loaded = record.load("default")
    preprocessing = record.default_preprocessing("default").with_image_size(96)
    folder = open_dataset(work / "data" / "fashion")
    test = [f for f in folder.files if f.split == "test"][:32]
    batch = torch.stack([preprocessing(load_image(folder.root / f.path)) for f in test])
    cpu = torch.device("cpu")
    tap = prepare_tap(loaded.model, [record.module_path(LAYER)], "avg", cpu, 96)
    engines = {
        "eager fp32": build_engine(tap, "eager", cpu, "fp32", batch),
        "openvino fp32": build_engine(tap, "openvino", cpu, "fp32", batch),
        "openvino int8": build_engine(tap, "openvino", cpu, "int8", batch, int8_key),
    }
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            for _ in range(3):
                engine(batch)
            times[name].append((time.perf_counter() - start) / 3)
    print(f"model-only, batch {len(batch)}, {repeats} interleaved repeats, "
          f"{torch.get_num_threads()} torch threads:")  # fmt: skip
    for name in engines:
        rate = len(batch) / statistics.median(times[name])
        vs = {
            base: statistics.median([b / a for a, b in zip(times[name], times[base], strict=True)])
            for base in ("eager fp32", "openvino fp32")
        }
        print(f"  {name:<14} {rate:7.1f} img/s  {vs['eager fp32']:.2f}x eager fp32, "
              f"{vs['openvino fp32']:.2f}x openvino fp32")  # fmt: skip


if __name__ == "__main__":
    main()
