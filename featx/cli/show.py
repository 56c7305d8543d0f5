"""Listings and reports: `featx info`, `layers`, `backbones`, `classifiers`, `runs`, `report`."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from featx.cli.app import app, printable, reported
from featx.cli.declare import AT_LEAST_ONE, IMAGE_SIZE, in_range
from featx.errors import UsageError

__all__ = ["RunsFormat", "backbones", "classifiers", "info", "layers", "report", "runs"]

# featx.report imports Jinja2, which `featx --help` does not need: its formats and the report's
# default number of full sections are restated here, and tests/test_cli.py holds them equal.
REPORT_BEST = 3


class RunsFormat(str, enum.Enum):
    """What `featx runs` prints (`featx.report.table.FORMATS`)."""

    table = "table"
    wide = "wide"
    json = "json"
    csv = "csv"


@app.command()
def info(
    path: Annotated[
        Path, typer.Argument(help="A feature store (.h5) or a model file from `featx fit`.")
    ],
) -> None:
    """Show what a store or a model file holds.

    A store: its layers, rows per split and class, skipped files and provenance; a model file:
    its classifier, layer, backbone, weights, classes and metrics.

    Reading a file runs no code from it: `info` never unpickles, so a pickle-based model file
    from an older featx is refused.

    Example: featx info stores/flowers-vgg16-default-std.h5
    """
    from featx.models.file import load_model, model_file_kind
    from featx.store.feature_store import FeatureStore

    with reported():
        try:
            kind = model_file_kind(path) if path.is_file() else "hdf5"
        except OSError:  # unreadable: FeatureStore says so
            kind = "hdf5"
        if kind == "zip":
            typer.echo(printable(load_model(path).summary(), keep="\n\t"))
            return
        if kind == "pickle":
            raise UsageError(
                f"{path} is a pickle-based model file from an older featx; loading it can run "
                "code, which featx info never does: pass --trust-pickle to evaluate or predict "
                "if you trust its source, or refit."
            )
        if kind == "other":
            raise UsageError(f"{path} is neither a featx store nor a featx model file.")
        with FeatureStore(path) as store:
            typer.echo(printable(store.summary(), keep="\n\t"))


@app.command()
def layers(
    backbone: Annotated[str, typer.Argument(help="Backbone name, or timm:NAME.")],
    image_size: Annotated[
        int | None,
        typer.Option(help="Square input size (as extract's --image-size).", callback=IMAGE_SIZE),
    ] = None,
    n_images: Annotated[
        int,
        typer.Option(help="Dataset size for the projected store size.", callback=AT_LEAST_ONE),
    ] = 1000,
    all_layers: Annotated[
        bool, typer.Option("--all", help="List every module, not just the main ones.")
    ] = False,
) -> None:
    """List the selectable layers of BACKBONE with output shapes and store sizes.

    Example: featx layers vgg16 --image-size 150 --n-images 2000
    """
    from featx.backbones.layers import layer_table

    with reported():
        typer.echo(layer_table(backbone, image_size, n_images, all_layers))


@app.command()
def backbones() -> None:
    """List the built-in backbones.

    Example: featx backbones
    """
    from featx.backbones.registry import available_backbones

    for name in available_backbones():
        typer.echo(name)
    typer.echo("timm:NAME  (any timm model)")


@app.command()
def classifiers() -> None:
    """List the classifiers `featx fit --clf` accepts.

    "stream": the classifier can train out-of-core.

    Example: featx classifiers
    """
    from featx.classify.registry import classifier_table

    typer.echo(classifier_table())


@app.command()
def runs(
    store: Annotated[
        list[Path] | None,
        typer.Option(help="Store (or its .runs.sqlite log); repeatable. Default: ./stores/**."),
    ] = None,
    fmt: Annotated[
        RunsFormat,
        typer.Option(
            "--format",
            help="table: the columns that fit the terminal; wide: every column; json, csv: "
            "every field of every run.",
        ),
    ] = RunsFormat.table,
) -> None:
    """Print the leaderboard of the logged fit, finetune and evaluate runs.

    Best first (validation accuracy, else test accuracy). fit's validation scores are those
    that chose the hyper-parameters, measured before any --refit all.

    Example: featx runs --store stores/flowers-vgg16-default-std.h5 --format wide
    """
    from featx.report import runs_command

    with reported():
        text = runs_command(store or [], fmt=fmt.value)
    typer.echo(text)


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="HTML file to write.")],
    store: Annotated[
        list[Path] | None,
        typer.Option(help="Store (or its .runs.sqlite log); repeatable. Default: ./stores/**."),
    ] = None,
    best: Annotated[
        int,
        typer.Option(
            help="Runs of each store shown in full; the others are collapsed.",
            callback=in_range(0, 100_000),
        ),
    ] = REPORT_BEST,
) -> None:
    """Write one self-contained HTML page of the logged runs: leaderboard, per-class metrics,
    confusion matrices, training histories, LR-finder curves, augmentation previews and each
    store's provenance. It needs no network to view.

    Example: featx report report.html --store stores/flowers-vgg16-default-std.h5
    """
    from featx.report import report_command

    with reported():
        path = report_command(out, store or [], best=best)
    typer.echo(f"report: {path}")
