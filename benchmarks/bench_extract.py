"""Extraction speed: featx against a plain loop, on the same photo-sized JPEGs, in one run.

The plain loop is what one writes by hand: PIL decode, the weights' torchvision transforms,
the model in batches under inference_mode, np.save. featx runs the same model (to `avgpool`)
with DataLoader workers, channels_last and a background writer; `--precision bf16` adds
bfloat16 autocast. Every featx run decodes at full size, as the plain loop does, except the
`--decode reduced` row (JPEGs drafted to at least twice the resize: only photos at least four
times the resize on their shorter side are affected, so use `--photo-size 1600x1200`). The
machine's matmul rate (best of a few torch.mm runs) is measured in the same run, so the
fraction of it that extraction reaches is comparable across machines.

    python benchmarks/bench_extract.py --backbone resnet50 --images 320 --repeats 3
    python benchmarks/bench_extract.py --images 96 --repeats 2 --photo-size 1600x1200
"""

from __future__ import annotations

import argparse
import os
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


def make_photos(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> None:
    """`n` JPEGs of `size` cut from scikit-image's bundled photos, in two classes."""
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(n):
        photo = Image.fromarray(photos[i % len(photos)])
        scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.3)
        photo = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1))
        x = rng.integers(0, photo.width - width + 1)
        y = rng.integers(0, photo.height - height + 1)
        target = folder / f"class{i % 2}"
        target.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + width, y + height)).save(target / f"{i:04d}.jpg", quality=90)


def plain_loop(
    backbone: str, files: list[Path], batch_size: int, out: Path, device: torch.device
) -> float:
    """Images per second of the hand-written loop."""
    record = get_backbone(backbone)
    torch.manual_seed(0)
    model = record.build().eval().to(device)
    model.fc = torch.nn.Identity()
    transform = torchvision.models.get_model_weights(backbone).DEFAULT.transforms()
    start = time.perf_counter()
    features = []
    with torch.inference_mode():
        for i in range(0, len(files), batch_size):
            batch = [transform(Image.open(f).convert("RGB")) for f in files[i : i + batch_size]]
            features.append(model(torch.stack(batch).to(device)).cpu().numpy())
    np.save(out, np.concatenate(features))
    return len(files) / (time.perf_counter() - start)


def featx_run(
    data: Path,
    store: Path,
    backbone: str,
    batch_size: int,
    precision: str,
    engine: str = "auto",
    decode: str = "full",
    device: str = "cpu",
):
    """Images per second of `featx.extract` (end to end, model set-up and any conversion
    included), the stored features, and the engine that ran (auto's choice)."""
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
        engine=engine,
        decode=decode,
        device=device,
        quiet=True,
    )
    seconds = time.perf_counter() - start
    with featx.FeatureStore(store) as s:
        used = str(s.layer("avgpool").attrs["engine"])
        return s.n_rows / seconds, s.read("avgpool").reshape(s.n_rows, -1), used


def matmul_gflops(device: torch.device, n: int = 2048, runs: int = 5) -> float:
    """The machine's fp32 matrix-multiply rate, best of `runs` (what its convolutions approach)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(runs + 1):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    per_row = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(per_row.min())


def model_only(
    backbone: str, engine: str, precision: str, batch_size: int, runs: int, device: torch.device
) -> float:
    """Images per second of the engine on random batches: the tapped network featx runs, no
    decoding or writing (the practical limit of this machine for that path)."""
    from featx.backbones.layers import prepare_tap
    from featx.inference import build_engine, cache_key

    loaded = get_backbone(backbone).load("none")
    tap = prepare_tap(loaded.model, ["avgpool"], "none", device, 224)
    x = torch.randn(batch_size, 3, 224, 224)
    key = cache_key(backbone, loaded.weights_sha256, ["avgpool"], "none", 224, precision, "bench")
    run = build_engine(tap, engine, device, precision, example=x, key=key)
    run(x)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def path_name(engine: str, precision: str, *decode: str) -> str:
    return f"{engine} {precision}" + (" --decode reduced" if decode else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager-bf16", action="store_true", help="also time eager bf16")
    parser.add_argument("--photo-size", default="640x480", help="JPEG size, WIDTHxHEIGHT")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="PATH",
        help='featx paths to run, named as in the table: "auto fp32" "auto fp32 --decode '
        'reduced" (eager fp32 always runs: the reference features)',
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    photo_size = tuple(int(v) for v in args.photo_size.split("x"))

    work = Path(tempfile.mkdtemp(prefix="featx-bench-"))
    try:
        make_photos(work / "data", args.images, photo_size)
        files = sorted((work / "data").rglob("*.jpg"))
        if device.type == "cuda":
            paths = [("eager", "fp32"), ("eager", "fp16"), ("eager", "bf16"), ("compile", "fp16")]
            paths += [("auto", "fp16"), ("auto", "fp16", "reduced")]
        else:
            paths = [("eager", "fp32"), ("openvino", "fp32"), ("auto", "fp32"), ("auto", "bf16")]
            if args.eager_bf16:  # very slow on CPUs without bf16 units (0.15x fp32 measured)
                paths.append(("eager", "bf16"))
            paths.append(("auto", "fp32", "reduced"))
        if args.only:
            wanted = {"eager fp32", *args.only}
            paths = [p for p in paths if path_name(*p) in wanted]
        rates: dict[str, list[float]] = {"plain": []}
        features: dict[str, np.ndarray] = {}
        used: dict[str, str] = {}  # the engine each row ran
        for _ in range(args.repeats):  # interleaved, so load changes hit every path alike
            rates["plain"].append(
                plain_loop(args.backbone, files, args.batch_size, work / "plain.npy", device)
            )
            for engine, precision, *decode in paths:
                name = path_name(engine, precision, *decode)
                rate, feats, used[name] = featx_run(
                    work / "data",
                    work / f"{engine}-{precision}-{'-'.join(decode)}.h5",
                    args.backbone,
                    args.batch_size,
                    precision,
                    engine,
                    *(decode or ["full"]),
                    device=args.device,
                )
                rates.setdefault(name, []).append(rate)
                features[name] = feats
        median = {name: statistics.median(v) for name, v in rates.items()}
        limits = {  # per engine and precision that ran, auto's choices included
            (engine, precision): model_only(
                args.backbone, engine, precision, args.batch_size, args.repeats * 3, device
            )
            for engine, precision in sorted({(used[n], n.split()[1]) for n in used})
        }
        gflop = 2 * GMACS.get(args.backbone, float("nan"))
        print(
            f"{args.backbone}, {args.images} JPEGs {args.photo_size}, batch {args.batch_size}, "
            f"medians of {args.repeats} interleaved runs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, device "
            f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
        )
        print()
        print(
            "| run | engine | images/s | vs plain | engine's model-only images/s | "
            "end-to-end share | cosine |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        plain = median["plain"]
        reference = features["eager fp32"]
        print(f"| plain loop (fp32) | eager | {plain:.1f} | 1.00x | | | |")
        for name, rate in median.items():
            if name == "plain":
                continue
            limit = limits[used[name], name.split()[1]]
            print(
                f"| featx {name} | {used[name]} | {rate:.1f} | {rate / plain:.2f}x | "
                f"{limit:.1f} | {rate / limit:.2f} | {cosine(features[name], reference):.5f} |"
            )
        print()
        print(f"GFLOP per image: {gflop:.1f}; fp32 matmul: {matmul_gflops(device):.0f} GFLOP/s")
        for (engine, precision), limit in limits.items():
            print(f"model-only {engine} {precision}: {limit * gflop:.0f} GFLOP/s")
        worst = max(
            float(np.abs(features[n] - reference).max() / np.abs(reference).max())
            for n in features
            if n.endswith("fp32")
        )
        print(f"fp32 engines vs eager fp32 features, max relative difference: {worst:.1e}")
        print(
            f"eager fp32 featx vs plain-loop features, max abs difference: "
            f"{np.abs(np.load(work / 'plain.npy') - reference).max():.2e}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
