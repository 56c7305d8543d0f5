"""The fine-tuning stage: `featx finetune`, `featx lr-find`, `featx augment-preview`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from featx.cli.app import app, command_line, report_skipped, reported
from featx.cli.declare import DATA_HELP, POSITIVE, SEED, Shared, from_settings, in_range
from featx.cli.options import (
    AugmentFlags,
    with_augmentation,
    with_finetune_augmentation,
    with_network,
)
from featx.errors import UsageError

__all__ = ["augment_preview", "finetune", "lr_find"]


def _finetune_config(network: dict[str, Any], augmentation: AugmentFlags, **training):
    """A FinetuneConfig from the shared options; returns it with (workers, device)."""
    from featx.finetuning.config import FINETUNE_AUGMENT, FinetuneConfig

    network = dict(network)
    workers, device, augment = network.pop("workers"), network.pop("device"), network.pop("augment")
    if not augment and augmentation.given:
        raise UsageError("augmentation settings were given together with --no-augment.")
    settings = augmentation.config(default=True, base=FINETUNE_AUGMENT) if augment else None
    config = FinetuneConfig(**network, **training, augment=settings)
    return config, workers, device


@app.command()
@with_finetune_augmentation
@with_network
@from_settings(Shared, None, only=("trust_pickle", "quiet"))
def finetune(
    data_dir: Annotated[Path, typer.Argument(help=DATA_HELP, metavar="DATA")],
    network: dict,
    augmentation: AugmentFlags,
    trust_pickle: bool,
    quiet: bool,
    epochs_head: Annotated[
        int | None,
        typer.Option(
            help="Epochs of stage 1, base frozen (default 5; 1 with --head MODEL; with "
            "--store up to 100 on the cached rows, 0 with --head MODEL).",
            callback=in_range(0, 100_000),
        ),
    ] = None,
    epochs: Annotated[
        int,
        typer.Option(
            help="Epochs of stage 2, unfrozen from --unfreeze-from.", callback=in_range(0, 100_000)
        ),
    ] = 15,
    lr: Annotated[
        float,
        typer.Option(help="Learning rate of the head (peak, with onecycle).", callback=POSITIVE),
    ] = 1e-4,
    lr_head: Annotated[
        float | None,
        typer.Option(
            help="Learning rate of the head in stage 1 (default --lr).", callback=POSITIVE
        ),
    ] = None,
    schedule: Annotated[
        str, typer.Option(help="onecycle, cosine-restarts or constant.")
    ] = "onecycle",
    patience: Annotated[
        int,
        typer.Option(
            help="Stop a stage after N epochs without a better validation loss (0: never; "
            "the best checkpoint is kept either way).",
            callback=in_range(0, 100_000),
        ),
    ] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default runs/<data>-<backbone>).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a finished or stopped run in --out.")
    ] = False,
    store: Annotated[
        Path | None,
        typer.Option(
            help="Train the head (stage 1) on this store's cached rows of the feature layer "
            "(with --head MODEL, the fitted head is stage 1 as it is); the run is logged in the "
            "store's experiment log."
        ),
    ] = None,
) -> None:
    """Fine-tune BACKBONE on DATA: train a new head on the frozen base (on a store's
    cached features with --store), then unfreeze the later blocks at small, layer-dependent
    learning rates, with augmentation. The model is the best checkpoint by validation loss
    over both stages; a test split is scored at the end.

    Writes checkpoints (best.pt, last.pt), config.json, history.json/.png, metrics.json,
    confusion-{validation,test}.png and model.featx (for `featx predict` and `featx evaluate`)
    into the run folder.

    Example: featx finetune data/cats_dogs --backbone vgg16 --image-size 150 --unfreeze-from
    block5_conv1 --epochs-head 5 --epochs 10 --lr 1e-4 --out runs/cats-dogs

    From the best model of a sweep (a logreg or mlp on one layer):
    featx fit --store S.h5 --layer block5_pool@avg --clf logreg --clf mlp --model best.featx
    featx finetune data/cats_dogs --backbone vgg16 --image-size 150 --head best.featx
    --store S.h5
    """
    from featx.finetuning.run import finetune as run

    with reported():
        config, workers, device = _finetune_config(
            network,
            augmentation,
            epochs_head=epochs_head,
            epochs=epochs,
            lr=lr,
            lr_head=lr_head,
            schedule=schedule,
            patience=patience,
        )
        result = run(
            data_dir,
            config,
            out=out,
            resume=resume,
            overwrite=overwrite,
            workers=workers,
            device=device,
            quiet=quiet,
            command=command_line(),
            trust_pickle=trust_pickle,
            store=store,
        )
    typer.echo(str(result.out))
    report_skipped(result.skipped)


@app.command("lr-find")
@with_finetune_augmentation
@with_network
@from_settings(Shared, None, only=("quiet",))
def lr_find(
    data_dir: Annotated[Path, typer.Argument(help=DATA_HELP, metavar="DATA")],
    network: dict,
    augmentation: AugmentFlags,
    quiet: bool,
    stage: Annotated[
        str, typer.Option(help="head (base frozen) or full (unfrozen from --unfreeze-from).")
    ] = "head",
    checkpoint: Annotated[
        Path | None, typer.Option(help="Start from a fine-tuning checkpoint (best.pt, last.pt).")
    ] = None,
    start_lr: Annotated[
        float, typer.Option(help="First learning rate of the sweep.", callback=POSITIVE)
    ] = 1e-7,
    end_lr: Annotated[
        float, typer.Option(help="Last learning rate of the sweep.", callback=POSITIVE)
    ] = 10.0,
    num_iter: Annotated[
        int, typer.Option(help="Steps of the sweep (at most).", callback=in_range(1, 1_000_000))
    ] = 100,
    out: Annotated[Path, typer.Option(help="PNG file for the loss curve.")] = Path("lr-find.png"),
) -> None:
    """Learning-rate range test: sweep the rate exponentially for a few mini-batches, plot the
    smoothed loss, stop when it diverges, and suggest the smaller of the steepest-descent rate
    and a tenth of the minimum's. Weights and optimiser state are restored afterwards.

    Example: featx lr-find data/cats_dogs --backbone vgg16 --image-size 150 --stage full
    --checkpoint runs/cats-dogs/best.pt
    """
    from featx.finetuning.lr_find import find_lr

    with reported():
        config, workers, device = _finetune_config(network, augmentation)
        result = find_lr(
            data_dir,
            config,
            stage=stage,
            checkpoint=checkpoint,
            start_lr=start_lr,
            end_lr=end_lr,
            num_iter=num_iter,
            plot=out,
            workers=workers,
            device=device,
            quiet=quiet,
        )
    if result.suggestion is None:
        typer.echo("no suggestion: the loss never decreased; try a wider sweep.")
    else:
        typer.echo(f"suggested learning rate: {result.suggestion:.2e} ({result.rule})")

    def rate(value: float | None) -> str:
        return f"{value:.2e}" if value is not None else "n/a"

    typer.echo(
        f"steepest descent at {rate(result.steepest)}, lowest smoothed loss at "
        f"{rate(result.minimum)} (a tenth: {rate(result.tenth_of_minimum)}); "
        f"{len(result.lrs)} steps"
        + (", stopped on divergence" if result.diverged else "")
        + f"; curve: {out}"
    )


@app.command("augment-preview")
@with_augmentation
def augment_preview(
    source: Annotated[
        Path, typer.Argument(help="An image file, or an image folder to pick images from.")
    ],
    augmentation: AugmentFlags,
    n: Annotated[
        int, typer.Option(help="Augmented views per image.", callback=in_range(1, 100))
    ] = 9,
    images: Annotated[
        int,
        typer.Option(
            help="Images picked from a folder (one per class first).", callback=in_range(1, 100)
        ),
    ] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the picks and the views.", callback=SEED)] = 0,
    tile: Annotated[
        int, typer.Option(help="Tile size in pixels.", callback=in_range(16, 2048))
    ] = 160,
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("preview.png"),
) -> None:
    """Write a grid of augmented views of images, to see what augmentation settings do.

    Each original comes first; the settings are stored in the PNG.

    Example: featx augment-preview data/flowers --n 9 --rotation 20 --zoom 0.1 --out preview.png
    """
    from featx.data.preview import augment_preview as run

    with reported():
        config = augmentation.config(default=True)
        path = run(source, config, out=out, n=n, images=images, seed=seed, tile=tile)
    typer.echo(str(path))
