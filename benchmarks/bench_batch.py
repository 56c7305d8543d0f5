"""Model-only speed against batch size on the CPU, per network and engine, interleaved.

On a CPU a batch only has to be large enough to keep the cores busy: beyond that its
activations overflow the caches and every layer streams them through memory. This times the
tap featx runs (`prepare_tap`, fp32, random-init weights, random inputs) at each batch size,
round-robin over networks, engines and sizes so a noisy machine slows them alike, and prints
the median images/s of each, relative to batch 32 (featx's batch before it chose one), next to
the batch featx chooses for that network on the CPU and why (`default_batch_size`).

    python benchmarks/bench_batch.py --rounds 5
    python benchmarks/bench_batch.py --networks resnet50:avgpool:224 --engines eager
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from featx.backbones import get_backbone
from featx.backbones.layers import default_batch_size, prepare_tap, trace_layers
from featx.inference import build_engine, cache_key, cpu_class

NETWORKS = [
    "resnet50:avgpool:224",
    "vgg16:block5_pool:150",
    "efficientnet_lite0:forward_features:224",
    "resnet18:avgpool:224",
    "mobilenet_v3_large:avgpool:224",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", default=NETWORKS, help="BACKBONE:LAYER:SIZE")
    parser.add_argument("--engines", nargs="+", default=["eager", "openvino"])
    parser.add_argument("--batches", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    parser.add_argument("--images", type=int, default=64, help="images per timing")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    runs = {}  # (network, engine) -> engine
    for spec in args.networks:
        name, layer, size = spec.split(":")
        record, size = get_backbone(name), int(size)
        module = record.module_path(layer)
        loaded = record.load("none", [module], size)
        tap = prepare_tap(loaded.model, [module], "avg", torch.device("cpu"), size)
        traced = trace_layers(record, record.skeleton("none"), size)
        chosen, why = default_batch_size(traced, [module], size, torch.device("cpu"))
        for engine in args.engines:
            key = cache_key(name, loaded.weights_sha256, [module], "avg", size, "fp32", "batch")
            example = torch.zeros(max(args.batches), 3, size, size)
            built = build_engine(tap, engine, torch.device("cpu"), "fp32", example, key)
            runs[spec, engine] = (built, size, why, chosen)

    rates: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(args.rounds):
        for (spec, engine), (built, size, _, _) in runs.items():
            for batch in args.batches:
                x = torch.randn(batch, 3, size, size)
                n = max(1, args.images // batch)
                with torch.inference_mode():
                    built(x)
                    start = time.perf_counter()
                    for _ in range(n):
                        built(x)
                rates.setdefault((spec, engine, batch), []).append(
                    n * batch / (time.perf_counter() - start)
                )

    print(
        f"# {platform.processor() or platform.machine()}, cpu class {cpu_class()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"medians of {args.rounds} interleaved rounds of {args.images} images, img/s "
        "(ratio to batch 32)"
    )
    header = " | ".join(f"batch {b}" for b in args.batches)
    print(f"| network | featx picks | why | engine | {header} |")
    print("|---|---:|---|---|" + "---:|" * len(args.batches))
    for (spec, engine), (_, _, why, chosen) in runs.items():
        medians = {b: statistics.median(rates[spec, engine, b]) for b in args.batches}
        base = medians.get(32)
        cells = " | ".join(
            f"{m:.1f}" + (f" ({m / base:.2f}x)" if base else "") for m in medians.values()
        )
        print(f"| {spec} | {chosen} | {why} | {engine} | {cells} |")


if __name__ == "__main__":
    main()
