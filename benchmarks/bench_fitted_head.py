"""Fine-tuning from the best model of a `featx fit` sweep on the project's Fashion-MNIST
example: the fitted logreg as stage 1 as it came (`--head MODEL --store STORE`, 0 stage-1
epochs) against one more stage-1 epoch on the images from it (`--epochs-head 1`), each scored
on the test split, with its wall-clock time.

    OMP_NUM_THREADS=1 python benchmarks/bench_fitted_head.py --work /tmp/fitted-head

Builds (or reuses) WORK/fashion as benchmarks/bench_ladder.py does (100 train / 50 test images
per class, no validation folder), extracts EfficientNet-Lite0's `forward_features` (offline
ImageNet weights, 96 px, avg pooled), fits a logreg on it and fine-tunes from that model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_ladder import NETWORK, make_fashion, run, test_accuracy

from featx.finetuning.run import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("fitted-head"))
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, help="stage-2 epochs (default: finetune's)")
    args = parser.parse_args()
    work = args.work.resolve()
    data = work / "fashion"
    make_fashion(data, args.train_per_class, args.test_per_class)
    store, model = work / "fashion.h5", work / "best.featx"
    run("extract", data, *NETWORK, "--layer", "forward_features", "--pool", "avg",
        "--store", store, cwd=work)  # fmt: skip
    _, fit_s = run("fit", "--store", store, "--layer", "forward_features@avg", "--clf", "logreg",
                   "--model", model, cwd=work)  # fmt: skip
    out, eval_s = run("evaluate", "--model", model, "--store", store, "--split", "test",
                      cwd=work)  # fmt: skip
    rows = [("frozen logreg (the --head model)", test_accuracy(out), None, fit_s + eval_s)]
    epochs = [] if args.epochs is None else ["--epochs", str(args.epochs)]
    for name, extra in (
        ("--head MODEL --store: 0 stage-1 epochs", []),
        ("--head MODEL --store --epochs-head 1", ["--epochs-head", "1"]),
    ):
        out_dir = work / ("head0" if not extra else "head1")
        extra = [*extra, *epochs]
        _, seconds = run("finetune", data, *NETWORK, "--head", model, "--store", store,
                         "--out", out_dir, "--overwrite", "--quiet", *extra,
                         cwd=work)  # fmt: skip
        metrics = json.loads((out_dir / "metrics.json").read_text())
        history = json.loads((out_dir / "history.json").read_text())
        last = load_checkpoint(out_dir / "last.pt")
        full = " ".join(f"{h['val_loss']:.3f}" for h in history if h["stage"] == "full")
        start = "-" if last["full_start"] is None else f"{last['full_start']:.3f}"
        vals = f"{start} | {full} | kept epoch {last['best']['epoch']}"
        rows.append((name, metrics["test"]["accuracy"], vals, seconds))
    print(
        f"{'run':<42} {'test accuracy':>13} {'seconds':>8}  validation loss: stage 2 start "
        "| stage 2 epochs | kept"
    )
    for name, accuracy, vals, seconds in rows:
        print(f"{name:<42} {accuracy:>13.3f} {seconds:>8.1f}  {vals or ''}")


if __name__ == "__main__":
    main()
