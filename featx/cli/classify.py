"""The classifier stage: `featx fit`, `featx evaluate`, `featx predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featx.classify.fit_settings import FitSettings
from featx.cli.app import app, command_line, echo_err, report_skipped, reported
from featx.cli.declare import Shared, from_settings
from featx.errors import EXIT_SKIPPED, UsageError
from featx.extraction.settings import PredictSettings

__all__ = ["evaluate", "fit", "predict"]

MODEL_HELP = "Model file written by `featx fit --model`."


def _size(text: str) -> int:
    """--memory-budget: a size such as 4GB."""
    from featx.runtime import parse_size

    try:
        return parse_size(text)
    except (OverflowError, ValueError):
        raise UsageError(f"{text!r} is not a finite size such as 500MB or 4GB.") from None


@app.command()
@from_settings(FitSettings, required=("layers",), parse={"memory_budget": _size})
@from_settings(Shared, None, only=("quiet",))
def fit(
    store: Annotated[Path, typer.Option(help="Feature store written by `featx extract`.")],
    settings: FitSettings,
    quiet: bool,
) -> None:
    """Train classifiers on stored layers: every --layer x --clf, ranked by validation score.

    Every experiment is appended to the store's run log (see `featx runs`).

    Example: featx fit --store stores/flowers.h5 --layer block4_pool --layer block5_pool
    --clf logreg --clf svm --param C=0.01,0.1,1 --model flowers.featx --report fit.json
    """
    from featx.classify.fitting import fit as run
    from featx.runtime import check_output_file

    model, report = settings.model, settings.report
    with reported():
        check_output_file("model", model)
        check_output_file("report", report)
        sweep = run(
            store,
            settings=settings,
            progress=None if quiet else echo_err,
            command=command_line(),
        )
    typer.echo(sweep.leaderboard())
    typer.echo("")
    typer.echo(sweep.details())
    for result in sweep.results:
        for warning in result.warnings:
            echo_err(f"warning: {result.classifier} on {result.layer}: {warning}")
    if model is not None:
        typer.echo(f"\nmodel: {model}")
    if report is not None:
        png = report.with_name(f"{report.stem}-confusion.png")
        typer.echo(f"report: {report}" + (f", {png}" if png.exists() else ""))


@app.command()
@from_settings(PredictSettings, exclude=("tta", "top_k"))
@from_settings(Shared, None, only=("trust_pickle",))
def evaluate(
    model: Annotated[Path, typer.Option(help=MODEL_HELP)],
    settings: PredictSettings,
    trust_pickle: bool,
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Image folder (DATA/SPLIT/CLASS/*.jpg) or manifest (.csv, .tsv, .parquet "
            "with columns path, label[, split]) to score instead of a store: its features "
            "are computed as `featx predict` computes them.",
            metavar="DATA",
        ),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(help="Store with the model's layer, backbone and preprocessing."),
    ] = None,
    split: Annotated[
        str, typer.Option(help="Split to score: test, validation, train or unsplit.")
    ] = "test",
    report: Annotated[
        Path | None, typer.Option(help="Write the metrics as JSON (plus a confusion PNG).")
    ] = None,
) -> None:
    """Score a model on a split of a store, or of an image folder or manifest.

    The store must be made with the same backbone, weights, preprocessing and layer (any
    other store is refused, saying what differs). An evaluation on a store is appended to its
    run log.

    Loading a model file runs no code from it (a pickle from an older featx only with
    --trust-pickle).

    Example: featx evaluate --model flowers.featx --store stores/flowers.h5 --split test,
    or featx evaluate --model flowers.featx data/flowers --split test
    """
    from featx.classify.evaluation import evaluate as on_store
    from featx.classify.evaluation import evaluate_images
    from featx.models.file import load_model
    from featx.runtime import check_output_file

    with reported():
        check_output_file("report", report)
        if (data is None) == (store is None):
            raise UsageError("give either --store STORE or an image folder DATA to evaluate on.")
        loaded = load_model(model, trust_pickle=trust_pickle)
        if store is not None:
            result = on_store(loaded, store, split, report=report, command=command_line())
        else:
            result = evaluate_images(
                loaded, data, split, settings, report=report, command=command_line()
            )  # fmt: skip
    typer.echo(result.table())
    if report is not None:
        typer.echo(f"\nreport: {report}, {report.with_name(f'{report.stem}-confusion.png')}")
    if result.skipped:
        for path, reason in result.skipped:
            echo_err(f"skipped {path}: {reason}")
        echo_err(f"featx: {len(result.skipped)} image files could not be read; not scored.")
        raise typer.Exit(EXIT_SKIPPED)


@app.command()
@from_settings(PredictSettings)
@from_settings(Shared, None, only=("trust_pickle",))
def predict(
    model: Annotated[Path, typer.Option(help=MODEL_HELP)],
    paths: Annotated[
        list[Path], typer.Argument(help="Image files or folders (searched below).", metavar="PATH")
    ],
    settings: PredictSettings,
    trust_pickle: bool,
    out: Annotated[
        Path | None, typer.Option(help="CSV file to write (default: print the CSV).")
    ] = None,
) -> None:
    """Classify images with a model.

    Runs the backbone, layer and preprocessing the model records, then its classifier; one
    CSV row per image with the top classes and their probabilities (decision scores for svm,
    linearsvm, ridge). Unreadable files are listed on stderr and skipped (exit code 3).

    Loading a model file runs no code from it (a pickle from an older featx only with
    --trust-pickle).

    Example: featx predict --model flowers.featx photos/ --out predictions.csv
    """
    from featx.classify.prediction import predict as run
    from featx.models.file import load_model
    from featx.runtime import check_output_file

    with reported():
        check_output_file("out", out)
        result = run(
            load_model(model, trust_pickle=trust_pickle), [str(p) for p in paths], settings, out=out
        )  # fmt: skip
    if out is None:
        typer.echo(result.to_csv(settings.top_k), nl=False)
    else:
        typer.echo(f"{len(result.paths)} predictions written to {out}", err=True)
    report_skipped(result.skipped, limit=None)
