"""Fine-tuning speed: seconds per epoch and training images per second, head and full stage.

The head stage runs the frozen base without gradients and trains only the head; the full stage
also back-propagates through the unfrozen blocks (the default `--unfreeze-from`). Both train
on photo-sized JPEGs with the default augmentation, DataLoader workers, channels_last and,
with `--precision bf16`, bfloat16 autocast. The first epoch of each configuration (worker
start-up, allocator warm-up) is not counted; the table shows the median of the others.

    python benchmarks/bench_finetune.py --backbone efficientnet_lite0 --images 160 --epochs 2
    python benchmarks/bench_finetune.py --backbone resnet50 --weights none --precision fp32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from bench_extract import make_photos  # the same photo-sized JPEGs

from featx.finetuning.config import FinetuneConfig
from featx.finetuning.session import Session


def measure(data: Path, config: FinetuneConfig, stage: str, epochs: int, workers: int | None):
    """Median seconds per epoch and images per second over `epochs` epochs after a warm-up."""
    session = Session(data, config, workers=workers, device="cpu", quiet=True)
    try:
        optimizer = session.optimizer(stage)
        scheduler = session.scheduler(optimizer, stage, epochs + 1)
        runs = [session.train_epoch(optimizer, scheduler, stage, e) for e in range(epochs + 1)]
    finally:
        session.close()
    timed = runs[1:]
    trainable = "head" if stage == "head" else f"head + from {session.unfreeze_from}"
    return (
        statistics.median(r["seconds"] for r in timed),
        statistics.median(r["images_per_second"] for r in timed),
        len(session.split.train),
        trainable,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per row")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--precision", action="append", choices=("fp32", "bf16"))
    args = parser.parse_args()
    precisions = args.precision or ["fp32", "bf16"]

    print(
        f"featx fine-tuning, {args.backbone} ({args.weights} weights) at "
        f"{args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| precision | stage | trainable | s / epoch | images / s |")
    print("|---|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "photos"
        make_photos(data, args.images)
        for precision in precisions:
            config = FinetuneConfig(
                backbone=args.backbone,
                weights=args.weights,
                image_size=args.image_size,
                batch_size=args.batch_size,
                precision=precision,
                val_fraction=0.1,
            )
            for stage in ("head", "full"):
                seconds, rate, n, trainable = measure(
                    data, config, stage, args.epochs, args.workers
                )
                print(f"| {precision} | {stage} | {trainable} | {seconds:.2f} | {rate:.1f} |")
        print(f"\n{n} training images per epoch, {args.epochs} timed epochs per row (median).")


if __name__ == "__main__":
    main()
