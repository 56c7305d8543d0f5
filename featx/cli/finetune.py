"""The fine-tuning stage: `featx finetune`, `featx lr-find`, `featx augment-preview`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from featx.cli.app import app, command_line, report_skipped, reported
from featx.cli.declare import DATA_HELP, POSITIVE, SEED, Shared, from_settings, in_range
from featx.cli.options import AugmentFlags, with_augmentation, with_finetune_augmentation
from featx.errors import UsageError
from featx.finetuning.config import FinetuneConfig
from featx.settings import DATA, OUTPUT, TRAINING

__all__ = ["augment_preview", "finetune", "lr_find"]

LR_FIND_LEAVES_OUT = ("epochs_head", "epochs", "lr", "lr_head", "schedule", "patience", "refit")

AUGMENT = typer.Option(
    "--augment/--no-augment",
    help="Augment training images (settings below).",
    rich_help_panel=TRAINING,
)


def _with_augmentation(
    config: FinetuneConfig, augment: bool, augmentation: AugmentFlags
) -> FinetuneConfig:
    """`config` with the augmentation settings given, or none with --no-augment."""
    if not augment and augmentation.given:
        raise UsageError("augmentation settings were given together with --no-augment.")
    settings = augmentation.config(default=True, base=config.augment) if augment else None
    return dataclasses.replace(config, augment=settings)


@app.command()
@with_finetune_augmentation
@from_settings(FinetuneConfig, "config")
@from_settings(Shared, None, only=("workers", "device", "trust_pickle", "quiet"))
def finetune(
    data_dir: Annotated[Path, typer.Argument(help=DATA_HELP, metavar="DATA")],
    config: FinetuneConfig,
    augmentation: AugmentFlags,
    workers: int | None,
    device: str,
    trust_pickle: bool,
    quiet: bool,
    augment: Annotated[bool, AUGMENT] = True,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder (default runs/<data>-<backbone>).", rich_help_panel=OUTPUT),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --out from its last checkpoint.", rich_help_panel=OUTPUT
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace a finished or stopped run in --out.", rich_help_panel=OUTPUT),
    ] = False,
    store: Annotated[
        Path | None,
        typer.Option(
            help="Train the head (stage 1) on this store's cached rows of the feature layer "
            "(with --head MODEL, the fitted head is stage 1 as it is); the run is logged in the "
            "store's experiment log.",
            rich_help_panel=DATA,
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
        result = run(
            data_dir,
            _with_augmentation(config, augment, augmentation),
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
@from_settings(FinetuneConfig, "config", exclude=LR_FIND_LEAVES_OUT)
@from_settings(Shared, None, only=("workers", "device", "quiet"))
def lr_find(
    data_dir: Annotated[Path, typer.Argument(help=DATA_HELP, metavar="DATA")],
    config: FinetuneConfig,
    augmentation: AugmentFlags,
    workers: int | None,
    device: str,
    quiet: bool,
    augment: Annotated[bool, AUGMENT] = True,
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
        result = find_lr(
            data_dir,
            _with_augmentation(config, augment, augmentation),
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
