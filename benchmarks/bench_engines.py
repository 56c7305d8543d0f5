"""Model-only speed and agreement of featx's inference engines, interleaved in one run.

Each engine x precision wraps the same tap featx runs (`prepare_tap`: BatchNorm folded,
channels_last, stopped after the deepest layer) of a random-init backbone, and is timed on the
same random batch, round-robin, so a noisy machine slows all of them alike. Setup (conversion,
compilation, or cache load) is timed separately. Features are compared with eager fp32 on a
full batch and on a short one (the last batch of a run).

int8 (OpenVINO + NNCF post-training quantization) is calibrated here on the random timing batch:
with random-init weights only its speed means something; its quality on real images and
weights is benchmarks/bench_int8.py's.

    python benchmarks/bench_engines.py --only "eager fp32" "openvino fp32 THROUGHPUT" int8

    python benchmarks/bench_engines.py --repeats 5
    python benchmarks/bench_engines.py --cache /tmp/featx-cache   # run twice: cold, then warm
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from featx.backbones import get_backbone
from featx.backbones.layers import prepare_tap
from featx.inference import (
    Calibration,
    build_engine,
    cache_key,
    cpu_class,
    cpu_features,
)

AUTOTUNE = {"compile_mode": "max-autotune-no-cudagraphs"}
# (label, engine, precision, options)
VARIANTS = [
    ("eager fp32", "eager", "fp32", {}),
    ("eager bf16", "eager", "bf16", {}),
    ("compile fp32", "compile", "fp32", {}),
    ("compile fp32 max-autotune", "compile", "fp32", AUTOTUNE),
    ("compile bf16", "compile", "bf16", {}),
    ("openvino fp32 LATENCY", "openvino", "fp32", {"ov_hint": "LATENCY"}),
    ("openvino fp32 THROUGHPUT", "openvino", "fp32", {"ov_hint": "THROUGHPUT"}),
    (
        "openvino fp32 THROUGHPUT 1 stream",
        "openvino",
        "fp32",
        {"ov_hint": "THROUGHPUT", "ov_streams": 1},
    ),
    ("openvino bf16 LATENCY", "openvino", "bf16", {"ov_hint": "LATENCY"}),
    ("openvino int8 THROUGHPUT", "openvino", "int8", {"ov_hint": "THROUGHPUT"}),
]


def agreement(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max relative difference, min row cosine) over every layer: |a-b| max over |ref| max."""
    rel, cos = 0.0, 1.0
    for k, r in ref.items():
        a = out[k].float().flatten(1)
        r = r.float().flatten(1)
        rel = max(rel, ((a - r).abs().max() / r.abs().max()).item())
        cos = min(cos, torch.nn.functional.cosine_similarity(a, r, dim=1).min().item())
    return rel, cos


def bench_model(args, backbone: str, layers: list[str], size: int) -> None:
    record = get_backbone(backbone)
    loaded = record.load("none")
    modules = [record.module_path(layer) for layer in layers]
    tap = prepare_tap(loaded.model, modules, "avg", torch.device("cpu"), size)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(args.batch, 3, size, size, generator=gen)
    short = batch[: max(1, args.batch // 3)].clone()
    print(f"\n== {backbone} {'+'.join(layers)} pool=avg {size}px batch {args.batch} ==")

    engines, setups = {}, {}
    chosen = [v for v in VARIANTS if not args.only or any(s in v[0] for s in args.only)]
    for label, name, precision, options in chosen:
        calibrated = ""
        if precision == "int8":
            calibration = Calibration(lambda: [batch], len(batch), 0, "random-batch")
            options, calibrated = {**options, "calibration": calibration}, calibration.key()
        key = cache_key(backbone, loaded.weights_sha256, layers, "avg", size, precision, name,
                        calibrated)  # fmt: skip
        start = time.perf_counter()
        engine = build_engine(tap, name, torch.device("cpu"), precision, batch, key, **options)
        engine(batch)  # first call (eager: allocator warm-up; others compiled already)
        setups[label] = time.perf_counter() - start
        engines[label] = engine
        print(f"built {label:<34} {setups[label]:7.1f}s  {engine.describe()}", flush=True)

    ref = engines["eager fp32"](batch)
    ref_short = engines["eager fp32"](short)
    times: dict[str, list[float]] = {label: [] for label in engines}
    for _ in range(args.repeats):
        for label, engine in engines.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                engine(batch)
            times[label].append((time.perf_counter() - start) / args.calls)

    base = args.batch / statistics.median(times["eager fp32"])
    print(
        f"\n{'engine':<34} {'img/s':>7} {'min-max':>13} {'ratio':>6} {'setup s':>8} "
        f"{'max rel':>9} {'min cos':>9} {'short rel':>9}"
    )
    for label, engine in engines.items():
        rates = [args.batch / t for t in times[label]]
        rate = statistics.median(rates)
        rel, cos = agreement(engine(batch), ref)
        srel, _ = agreement(engine(short), ref_short)
        name = label if not engine.fallback_reason else f"{label} -> eager"
        print(
            f"{name:<34} {rate:7.2f} {min(rates):6.2f}-{max(rates):<6.2f} {rate / base:6.2f} "
            f"{setups[label]:8.1f} {rel:9.2e} {cos:9.6f} {srel:9.2e}"
        )
    int8, ov32 = "openvino int8 THROUGHPUT", "openvino fp32 THROUGHPUT"
    if int8 in times and ov32 in times:  # per repeat: both ran within the same round
        ratios = [b / a for a, b in zip(times[int8], times[ov32], strict=True)]
        print(f"\n{int8} / {ov32}: {statistics.median(ratios):.2f}x "
              f"(per-repeat {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="batches per timed repeat")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vgg", action="store_true", help="also VGG16 block5_pool at 150px")
    parser.add_argument("--only", nargs="*", help="variants whose label contains one of these")
    parser.add_argument("--cache", help="engine cache directory (default: a fresh temp dir)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--layers", nargs="+", default=["layer3", "avgpool"])
    parser.add_argument("--size", type=int, default=224, help="input size, px")
    args = parser.parse_args()

    cache = args.cache or tempfile.mkdtemp(prefix="featx-engines-")
    os.environ["FEATX_CACHE"] = cache
    flags = cpu_features()
    shown = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu class "
          f"{cpu_class()}, flags: {' '.join(shown)}")  # fmt: skip
    try:
        import openvino

        print(f"openvino {openvino.__version__}")
    except ImportError:
        print("openvino not installed")
    print(f"cache {cache} ({'given' if args.cache else 'fresh'}); repeats {args.repeats} x "
          f"{args.calls} batches, medians; ratio = vs eager fp32 channels_last")  # fmt: skip

    bench_model(args, args.backbone, args.layers, args.size)
    if args.vgg:
        bench_model(args, "vgg16", ["block5_pool"], 150)


if __name__ == "__main__":
    main()
