"""Extraction speed: featx against a plain loop, on the same photo-sized JPEGs, in one run.

The plain loop is what one writes by hand: PIL decode, the weights' torchvision transforms,
the model in batches under inference_mode, np.save. featx runs the same model (to `avgpool`)
with DataLoader workers, channels_last and a background writer; `--precision bf16` adds
bfloat16 autocast. The machine's matmul rate (best of a few torch.mm runs) is measured in the
same run, so the fraction of it that extraction reaches is comparable across machines.

    python benchmarks/bench_extract.py --backbone resnet50 --images 320 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

import featx
from featx.backbones.registry import get_backbone

# torchvision's GFLOPS table counts multiply-adds; one image costs twice that in FLOP.
GMACS = {"resnet50": 4.09, "vgg16": 15.47, "resnet18": 1.81, "efficientnet_b0": 0.39}


def make_photos(folder: Path, n: int) -> None:
    """`n` 640x480 JPEGs cut from scikit-image's bundled photos, in two classes."""
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = Image.fromarray(photos[i % len(photos)])
        scale = 640 / min(photo.size) * rng.uniform(1.0, 1.3)
        photo = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1))
        x, y = rng.integers(0, photo.width - 640 + 1), rng.integers(0, photo.height - 480 + 1)
        target = folder / f"class{i % 2}"
        target.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + 640, y + 480)).save(target / f"{i:04d}.jpg", quality=90)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, runs: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(runs):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def plain_loop(backbone: str, files: list[Path], batch_size: int, out: Path) -> float:
    """Images per second of the hand-written loop."""
    record = get_backbone(backbone)
    torch.manual_seed(0)
    model = record.build().eval()
    model.fc = torch.nn.Identity()
    transform = torchvision.models.get_model_weights(backbone).DEFAULT.transforms()
    start = time.perf_counter()
    features = []
    with torch.inference_mode():
        for i in range(0, len(files), batch_size):
            batch = [transform(Image.open(f).convert("RGB")) for f in files[i : i + batch_size]]
            features.append(model(torch.stack(batch)).numpy())
    np.save(out, np.concatenate(features))
    return len(files) / (time.perf_counter() - start)


def featx_run(data: Path, store: Path, backbone: str, batch_size: int, precision: str):
    """Images per second of `featx.extract`, and the stored features."""
    store.unlink(missing_ok=True)
    start = time.perf_counter()
    featx.extract(
        data,
        backbone,
        ["avgpool"],
        store=store,
        weights="none",
        batch_size=batch_size,
        precision=precision,
        quiet=True,
    )
    seconds = time.perf_counter() - start
    with featx.FeatureStore(store) as s:
        return s.n_rows / seconds, s.read("avgpool").reshape(s.n_rows, -1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    per_row = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(per_row.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="featx-bench-"))
    try:
        make_photos(work / "data", args.images)
        files = sorted((work / "data").rglob("*.jpg"))
        mm32, mm16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
        plain, fp32, bf16 = [], [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(args.backbone, files, args.batch_size, work / "plain.npy"))
            rate, f32 = featx_run(
                work / "data", work / "f32.h5", args.backbone, args.batch_size, "fp32"
            )
            fp32.append(rate)
            rate, b16 = featx_run(
                work / "data", work / "bf16.h5", args.backbone, args.batch_size, "bf16"
            )
            bf16.append(rate)
        plain_m, fp32_m, bf16_m = (statistics.median(v) for v in (plain, fp32, bf16))
        gflop = 2 * GMACS.get(args.backbone, float("nan"))
        print(
            f"{args.backbone}, {args.images} JPEGs 640x480, batch {args.batch_size}, "
            f"medians of {args.repeats} runs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        print()
        print("| run | images/s | vs plain | GFLOP/s | of fp32 mm | of bf16 mm |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, rate in (
            ("plain loop (fp32)", plain_m),
            ("featx fp32", fp32_m),
            ("featx bf16", bf16_m),
        ):
            print(
                f"| {name} | {rate:.1f} | {rate / plain_m:.2f}x | {rate * gflop:.0f} | "
                f"{rate * gflop / mm32:.2f} | {rate * gflop / mm16:.2f} |"
            )
        print()
        print(f"torch.mm 2048^2: {mm32:.0f} GFLOP/s float32, {mm16:.0f} GFLOP/s bfloat16")
        print(
            f"bf16 / fp32 extraction speed: {bf16_m / fp32_m:.2f}x; "
            f"lowest per-image cosine similarity bf16 vs fp32: {cosine(b16, f32):.5f}"
        )
        print(
            f"fp32 featx vs plain-loop features, max abs difference: "
            f"{np.abs(np.load(work / 'plain.npy') - f32).max():.2e}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
