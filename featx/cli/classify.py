"""The classifier stage: `featx fit`, `featx evaluate`, `featx predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featx.cli.app import app, command_line, echo_err, fail, report_skipped, reported
from featx.cli.declare import (
    FRACTION,
    SEED,
    Shared,
    check_n_jobs,
    from_settings,
    in_range,
)
from featx.errors import EXIT_SKIPPED, UsageError


def _memory_budget(ctx: typer.Context, param: typer.CallbackParam, value: str | None):
    """--memory-budget: a finite size such as 4GB, at most 1 PiB."""
    if value is None or ctx.resilient_parsing:
        return value
    from featx.errors import FeatxError
    from featx.runtime import parse_size

    try:
        size = parse_size(value)
    except FeatxError as error:
        raise fail(f"--memory-budget: {error}") from None
    except (OverflowError, ValueError):
        raise fail(f"--memory-budget must be a finite size such as 4GB, not {value!r}.") from None
    if not 0 < size <= 2**50:
        raise fail(f"--memory-budget must be above 0 and at most 1 PiB, not {value!r}.")
    return size


__all__ = ["evaluate", "fit", "predict"]


@app.command()
def fit(
    store: Annotated[Path, typer.Option(help="Feature store written by `featx extract`.")],
    layer: Annotated[
        list[str],
        typer.Option(
            help="Stored layer (see `featx info STORE`); repeat to compare layers. Join "
            "several with + (blocks.4+bn2): each pooled, standardised, concatenated."
        ),
    ],
    clf: Annotated[
        list[str] | None,
        typer.Option(
            help="Classifier: logreg, linearsvm, svm, knn, rf, ridge, sgd or mlp (see `featx "
            "classifiers`); repeat to compare. Default: logreg."
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            help="Hyper-parameter [CLF.]NAME=VALUE; several values (C=0.01,0.1,1) are searched "
            "on the validation rows or by --cv. Repeatable."
        ),
    ] = None,
    scale: Annotated[bool, typer.Option(help="Standardise features before the classifier.")] = True,
    pca: Annotated[
        int | None,
        typer.Option(
            help="Reduce features to N principal components.", callback=in_range(1, 1_000_000)
        ),
    ] = None,
    l2: Annotated[
        bool, typer.Option(help="L2-normalise each feature vector (after scaling and PCA).")
    ] = False,
    pool: Annotated[
        str | None,
        typer.Option(help="avg, max or avgmax over a stored spatial map (default: flatten it)."),
    ] = None,
    cv: Annotated[
        int | None,
        typer.Option(
            help="Stratified K-fold cross-validation grouped by source image.",
            callback=in_range(2, 1000),
        ),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option(
            help="Hold-out share of images when the store has no validation split.",
            callback=FRACTION,
        ),
    ] = 0.2,
    seed: Annotated[
        int, typer.Option(help="Seed of the hold-out, folds and classifiers.", callback=SEED)
    ] = 0,
    metric: Annotated[
        str, typer.Option(help="Ranking metric: accuracy, balanced_accuracy or f1_macro.")
    ] = "accuracy",
    refit: Annotated[
        str | None,
        typer.Option(
            help="After choosing hyper-parameters: all refits on training + validation rows, "
            "train keeps the fit on training rows. Default: train when the store has a "
            "validation split, all when the validation rows are a hold-out or CV folds."
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(help="Save the best experiment's model file here (e.g. flowers.featx)."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Write every experiment's metrics as JSON (plus a confusion PNG)."),
    ] = None,
    n_jobs: Annotated[
        int,
        typer.Option(
            help="Parallel jobs for grid search and rf/knn/sgd (-1: all cores).",
            callback=check_n_jobs,
        ),
    ] = 1,
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--no-stream",
            help="Train out-of-core from row chunks (sgd, mlp). Default: only when the layer "
            "does not fit the memory budget.",
        ),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Memory for in-memory fits, e.g. 4GB. Default: half of what is free.",
            callback=_memory_budget,
        ),
    ] = None,
    chunk_mb: Annotated[
        float,
        typer.Option(
            help="Size of a row chunk when streaming, in MB of float32.",
            callback=in_range(0, 1e6, above=True),
        ),
    ] = 64.0,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """Train classifiers on stored layers: every --layer x --clf, ranked by validation score.

    Every experiment is appended to the store's run log (see `featx runs`).

    Example: featx fit --store stores/flowers.h5 --layer block4_pool --layer block5_pool
    --clf logreg --clf svm --param C=0.01,0.1,1 --model flowers.featx --report fit.json
    """
    from featx.classify.fit import fit as run
    from featx.runtime import check_output_file

    with reported():
        check_output_file("model", model)
        check_output_file("report", report)
        sweep = run(
            store,
            layer,
            clf or ["logreg"],
            params=param,
            scale=scale,
            pca=pca,
            l2=l2,
            pool=pool,
            cv=cv,
            val_fraction=val_fraction,
            seed=seed,
            metric=metric,
            n_jobs=n_jobs,
            stream=stream,
            memory_budget=memory_budget,
            chunk_bytes=int(chunk_mb * 1e6),
            refit=refit,
            model=model,
            report=report,
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
@from_settings(
    Shared,
    None,
    only=("trust_pickle", "batch_size", "device", "workers", "engine"),
    defaults={"workers": 0},
)
def evaluate(
    model: Annotated[Path, typer.Option(help="Model file written by `featx fit --model`.")],
    trust_pickle: bool,
    batch_size: int | None,
    device: str,
    workers: int,
    engine: str,
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Image folder (DATA/SPLIT/CLASS/*.jpg) to score instead of a store: its "
            "features are computed as `featx predict` computes them."
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
    """Score a model on a split of a store or of an image folder.

    The store must be made with the same backbone, weights, preprocessing and layer (any
    other store is refused, saying what differs). An evaluation on a store is appended to its
    run log.

    Loading a model file runs no code from it (a pickle from an older featx only with
    --trust-pickle).

    Example: featx evaluate --model flowers.featx --store stores/flowers.h5 --split test,
    or featx evaluate --model flowers.featx data/flowers --split test
    """
    from featx.classify.evaluate import evaluate as on_store
    from featx.classify.evaluate import evaluate_images
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
                loaded, data, split, report=report, batch_size=batch_size, device=device,
                workers=workers, quiet=False, command=command_line(), engine=engine,
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
@from_settings(
    Shared,
    None,
    only=("trust_pickle", "batch_size", "device", "workers", "engine", "quiet"),
    defaults={"workers": 0},
)
def predict(
    model: Annotated[Path, typer.Option(help="Model file written by `featx fit --model`.")],
    paths: Annotated[
        list[Path], typer.Argument(help="Image files or folders (searched below).", metavar="PATH")
    ],
    trust_pickle: bool,
    batch_size: int | None,
    device: str,
    workers: int,
    engine: str,
    quiet: bool,
    out: Annotated[
        Path | None, typer.Option(help="CSV file to write (default: print the CSV).")
    ] = None,
    top_k: Annotated[
        int, typer.Option(help="Best classes listed per image.", callback=in_range(1, 1000))
    ] = 3,
    tta: Annotated[
        int,
        typer.Option(
            help="Test-time augmentation: also score N augmented views and average.",
            callback=in_range(0, 1000),
        ),
    ] = 0,
) -> None:
    """Classify images with a model.

    Runs the backbone, layer and preprocessing the model
    records, then its classifier; one CSV row per image with the top classes and their
    probabilities (decision scores for svm, linearsvm, ridge). Unreadable files are listed on
    stderr and skipped (exit code 3).

    Loading a model file runs no code from it (a pickle from an older featx only with
    --trust-pickle).

    Example: featx predict --model flowers.featx photos/ --out predictions.csv
    """
    from featx.classify.predict import predict as run
    from featx.models.file import load_model
    from featx.runtime import check_output_file

    with reported():
        check_output_file("out", out)
        result = run(
            load_model(model, trust_pickle=trust_pickle),
            [str(p) for p in paths],
            out=out,
            top_k=top_k,
            batch_size=batch_size,
            device=device,
            workers=workers,
            tta=tta,
            quiet=quiet,
            engine=engine,
        )
    if out is None:
        typer.echo(result.to_csv(top_k), nl=False)
    else:
        typer.echo(f"{len(result.paths)} predictions written to {out}", err=True)
    report_skipped(result.skipped, limit=None)
