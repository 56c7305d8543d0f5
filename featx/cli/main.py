"""The `featx` command line: thin typer commands over the library.

Exit codes: 0 done; 2 bad input (usage, data, weights, store mismatch, store locked);
3 done, but some image files could not be read and were skipped; 130 interrupted (resumable).
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from featx.cli.options import (
    AT_LEAST_ONE,
    FRACTION,
    IMAGE_SIZE,
    NOT_NEGATIVE,
    POSITIVE,
    AugmentFlags,
    check_n_jobs,
    in_range,
    with_augmentation,
    with_network,
)
from featx.errors import EXIT_SKIPPED, FeatxError, UsageError

__all__ = [
    "augment_preview",
    "backbones",
    "classifiers",
    "evaluate",
    "extract",
    "finetune",
    "fit",
    "info",
    "layers",
    "lr_find",
    "main",
    "predict",
    "reported",
]

app = typer.Typer(
    help="Extract frozen-backbone features once into HDF5 stores; train classifiers on them.\n\n"
    "Example: featx extract data/flowers --backbone vgg16 --layer block4_pool, then\n\n"
    "featx fit --store stores/flowers-vgg16-default-std.h5 --layer block4_pool --clf logreg\n\n"
    "Exit codes: 0 ok, 2 bad input, 3 finished with skipped image files, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from featx import __version__

        typer.echo(f"featx {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Extract frozen-backbone features once into HDF5 stores; train classifiers on them."""


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a batch scheduler's stop: the same clean, resumable stop as Ctrl-C


@contextlib.contextmanager
def reported():
    """Turn library errors into one line on stderr and their exit code; SIGTERM stops the
    command like Ctrl-C (exit 130)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None
    try:
        yield
    except FeatxError as error:
        typer.echo(f"featx: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("featx: interrupted.", err=True)
        raise typer.Exit(130) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _command_line() -> str:
    return "featx " + shlex.join(sys.argv[1:])


EngineOption = Annotated[
    str,
    typer.Option(
        help="What runs the network: auto (picked by measured speed and run length), eager, "
        "compile (torch.compile) or openvino."
    ),
]
BatchSizeOption = Annotated[
    int | None,
    typer.Option(
        help="Images per forward pass, for images decoded (default: on the CPU, the largest "
        "power of two from 4 to 16 whose activations fit in 256 MB, which the run says; 32 on "
        "a GPU).",
        callback=AT_LEAST_ONE,
    ),
]


@app.command()
@with_augmentation
def extract(
    data_dir: Annotated[
        Path,
        typer.Argument(
            help="Image folder (DATA/CLASS/*.jpg or DATA/{train,validation,test}/CLASS/*.jpg) "
            "or a manifest (.csv, .tsv, .parquet with columns path, label[, split])."
        ),
    ],
    backbone: Annotated[
        str, typer.Option(help="Backbone name (see `featx backbones`), or timm:NAME.")
    ],
    layer: Annotated[
        list[str],
        typer.Option(
            help="Layer to store; repeat for several (one pass). See `featx layers BACKBONE`."
        ),
    ],
    augmentation: AugmentFlags,
    store: Annotated[
        Path | None,
        typer.Option(help="Store file; default stores/<data>-<backbone>-<weights>-<size>.h5."),
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            help="default, a named weights set (IMAGENET1K_V1), none (seeded random), "
            "or a .pth/.safetensors file."
        ),
    ] = "default",
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Resize straight to N x N with no crop (Keras target_size) instead of "
            "the weights' resize and crop.",
            callback=IMAGE_SIZE,
        ),
    ] = None,
    pool: Annotated[
        str, typer.Option(help="Reduce spatial maps before storing: none, avg, max, avgmax.")
    ] = "none",
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32 or float16.")] = "float32",
    compression: Annotated[str, typer.Option(help="HDF5 compression: none, lzf or gzip.")] = "none",
    precision: Annotated[
        str,
        typer.Option(
            help="Compute precision: fp32, bf16 (bf16 weights; CPU or GPU), fp16 (GPU), int8 "
            "(OpenVINO post-training quantization on the CPU, calibrated on up to 300 training "
            "images chosen with --seed)."
        ),
    ] = "fp32",
    engine: EngineOption = "auto",
    decode: Annotated[
        str | None,
        typer.Option(
            help="reduced: decode large JPEGs at a reduced size (still 2x the resize or "
            "more; 3x faster on 1600x1200 photos), or full. Default: an existing store's "
            "decoding, else reduced.",
            metavar="full|reduced",
        ),
    ] = None,
    batch_size: BatchSizeOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Decoding processes (default: half the cores, at most 4; 0 decodes in-process).",
            callback=NOT_NEGATIVE,
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    augment: Annotated[
        int,
        typer.Option(
            help="Also store K augmented views of each training image.", callback=NOT_NEGATIVE
        ),
    ] = 0,
    seed: Annotated[
        int, typer.Option(help="Seed of the augmented views and of int8's calibration images.")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a store that was made differently.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar or messages.")] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Compute only shard I/N (0-based) of the rows into STORE.shard-IofN.h5, or "
            "`slurm` for the array task's; join the shards with `featx merge`."
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run the shards as Ray tasks and merge them: `local` starts a Ray instance "
            "on this machine, else the cluster's address (auto, ray://HOST:10001). Needs "
            "featx[ray].",
            rich_help_panel="Scaling out",
        ),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            help="With --ray: how many shards (default: one per GPU, else per CPU).",
            rich_help_panel="Scaling out",
        ),
    ] = None,
    ray_cpus_per_shard: Annotated[
        float | None,
        typer.Option(help="With --ray: CPUs per shard task.", rich_help_panel="Scaling out"),
    ] = None,
    ray_gpus_per_shard: Annotated[
        float | None,
        typer.Option(help="With --ray: GPUs per shard task.", rich_help_panel="Scaling out"),
    ] = None,
) -> None:
    """Run BACKBONE over DATA_DIR once and store the chosen layers' features.

    Re-running resumes an interrupted run, reuses layers already stored, and adds new ones.

    Example: featx extract data/flowers --backbone vgg16 --layer block4_pool --layer block5_pool
    """
    from featx.extraction.run import extract as run
    from featx.extraction.shard import parse_shard

    with reported():
        config = augmentation.config()
        if config is not None and not augment:
            raise UsageError("augmentation settings apply to augmented views; add --augment K.")
        if ray is not None:
            if shard:
                raise UsageError("--ray runs every shard itself; give --ray or --shard, not both.")
            from featx.extraction.distributed import extract_on_ray

            ray_options = {
                "address": None if ray == "local" else ray,
                "shards": shards,
                "cpus_per_shard": ray_cpus_per_shard,
                "gpus_per_shard": ray_gpus_per_shard,
            }
            run = functools.partial(extract_on_ray, **ray_options)
        elif shards is not None:
            raise UsageError("--shards goes with --ray; for one shard use --shard I/N.")
        else:
            run = functools.partial(run, shard=parse_shard(shard) if shard else None)
        result = run(
            data_dir,
            backbone,
            layer,
            store=store,
            weights=weights,
            image_size=image_size,
            pool=pool,
            dtype=dtype,
            compression=compression,
            precision=precision,
            engine=engine,
            batch_size=batch_size,
            workers=workers,
            device=device,
            overwrite=overwrite,
            quiet=quiet,
            augment=augment,
            augment_config=config,
            seed=seed,
            decode=decode,
            command=_command_line(),
        )
    typer.echo(str(result.store))
    if result.skipped:
        typer.echo(f"{len(result.skipped)} file(s) could not be read and were skipped:", err=True)
        for path, reason in result.skipped[:20]:
            typer.echo(f"  {path}: {reason}", err=True)
        if len(result.skipped) > 20:
            typer.echo(f"  ... and {len(result.skipped) - 20} more (see `featx info`)", err=True)
        raise typer.Exit(EXIT_SKIPPED)


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="The merged store to write.")],
    shards: Annotated[list[Path], typer.Argument(help="Every shard store of one extraction.")],
    virtual: Annotated[
        bool,
        typer.Option(
            help="Map the shards' features in place (HDF5 virtual datasets) instead of "
            "copying them; the shard files must then stay where they are."
        ),
    ] = False,
) -> None:
    """Join the shard stores of `featx extract --shard I/N` into one store.

    Example: featx merge stores/flowers.h5 stores/flowers.shard-*.h5
    """
    from featx.store.merge import merge as run

    with reported():
        path = run(out, shards, virtual=virtual, command=_command_line())
    typer.echo(str(path))


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
def info(
    path: Annotated[
        Path, typer.Argument(help="A feature store (.h5) or a model file from `featx fit`.")
    ],
) -> None:
    """Show what a store holds (layers, rows per split and class, skipped files, provenance),
    or what a model file holds (classifier, layer, backbone, weights, classes, metrics).

    Reading a file runs no code from it: `info` never unpickles, so a pickle-based model file
    from an older featx is refused.

    Example: featx info stores/flowers-vgg16-default-std.h5
    """
    from featx.errors import UsageError
    from featx.models.file import load_model, model_file_kind
    from featx.store.feature_store import FeatureStore

    with reported():
        try:
            kind = model_file_kind(path) if path.is_file() else "hdf5"
        except OSError:  # unreadable: FeatureStore says so
            kind = "hdf5"
        if kind == "zip":
            typer.echo(load_model(path).summary())
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
            typer.echo(store.summary())


# ---- classifier stage: fit, evaluate, predict ----------------------------------------------


def _echo_err(text: str) -> None:
    typer.echo(text, err=True)


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
        typer.Option(help="Reduce features to N principal components.", callback=AT_LEAST_ONE),
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
            callback=in_range(2),
        ),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option(
            help="Hold-out share of images when the store has no validation split.",
            callback=FRACTION,
        ),
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the hold-out, folds and classifiers.")] = 0,
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
        typer.Option(help="Memory for in-memory fits, e.g. 4GB (default: half of what is free)."),
    ] = None,
    chunk_mb: Annotated[
        float,
        typer.Option(
            help="Size of a row chunk when streaming, in MB of float32.", callback=POSITIVE
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
    from featx.runtime import check_output_file, parse_size

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
            memory_budget=parse_size(memory_budget) if memory_budget else None,
            chunk_bytes=int(chunk_mb * 1e6),
            refit=refit,
            model=model,
            report=report,
            progress=None if quiet else _echo_err,
            command=_command_line(),
        )
    typer.echo(sweep.leaderboard())
    typer.echo("")
    typer.echo(sweep.details())
    for result in sweep.results:
        for warning in result.warnings:
            _echo_err(f"warning: {result.classifier} on {result.layer}: {warning}")
    if model is not None:
        typer.echo(f"\nmodel: {model}")
    if report is not None:
        png = report.with_name(f"{report.stem}-confusion.png")
        typer.echo(f"report: {report}" + (f", {png}" if png.exists() else ""))


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="Model file written by `featx fit --model`.")],
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
    trust_pickle: Annotated[
        bool,
        typer.Option(
            help="Also load a pickle-based model file from an older featx; unpickling runs "
            "code stored in the file: only for files you trust."
        ),
    ] = False,
    batch_size: BatchSizeOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps (DATA).")] = "auto",
    workers: Annotated[int, typer.Option(help="Decoding processes (DATA; 0: in-process).")] = 0,
    engine: EngineOption = "auto",
) -> None:
    """Score a model on a split of a store made with the same backbone, weights,
    preprocessing and layer (any other store is refused, saying what differs), or on a split
    of an image folder. An evaluation on a store is appended to its run log.

    Loading a model file runs no code from it (a pickle from an older featx only with
    --trust-pickle).

    Example: featx evaluate --model flowers.featx --store stores/flowers.h5 --split test,
    or featx evaluate --model flowers.featx data/flowers --split test
    """
    from featx.classify.evaluate import evaluate as on_store
    from featx.classify.evaluate import evaluate_images
    from featx.errors import UsageError
    from featx.models.file import load_model
    from featx.runtime import check_output_file

    with reported():
        check_output_file("report", report)
        if (data is None) == (store is None):
            raise UsageError("give either --store STORE or an image folder DATA to evaluate on.")
        loaded = load_model(model, trust_pickle=trust_pickle)
        if store is not None:
            result = on_store(loaded, store, split, report=report, command=_command_line())
        else:
            result = evaluate_images(
                loaded, data, split, report=report, batch_size=batch_size, device=device,
                workers=workers, quiet=False, command=_command_line(), engine=engine,
            )  # fmt: skip
    typer.echo(result.table())
    if report is not None:
        typer.echo(f"\nreport: {report}, {report.with_name(f'{report.stem}-confusion.png')}")
    if result.skipped:
        for path, reason in result.skipped:
            _echo_err(f"skipped {path}: {reason}")
        _echo_err(f"featx: {len(result.skipped)} image files could not be read; not scored.")
        raise typer.Exit(EXIT_SKIPPED)


@app.command()
def runs(
    store: Annotated[
        list[Path] | None,
        typer.Option(help="Store (or its .runs.sqlite log); repeatable. Default: ./stores/**."),
    ] = None,
) -> None:
    """Print the leaderboard of every logged fit, finetune and evaluate run, best first
    (validation accuracy, else test accuracy). fit's validation scores are those that chose
    the hyper-parameters, measured before any --refit all.

    Example: featx runs --store stores/flowers-vgg16-default-std.h5
    """
    from featx.report import runs_command

    with reported():
        text = runs_command(store or [])
    typer.echo(text)


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="HTML file to write.")],
    store: Annotated[
        list[Path] | None,
        typer.Option(help="Store (or its .runs.sqlite log); repeatable. Default: ./stores/**."),
    ] = None,
) -> None:
    """Write one self-contained HTML page of the logged runs: leaderboard, per-class metrics,
    confusion matrices, training histories, LR-finder curves, augmentation previews and each
    store's provenance. It needs no network to view.

    Example: featx report report.html --store stores/flowers-vgg16-default-std.h5
    """
    from featx.report import report_command

    with reported():
        path = report_command(out, store or [])
    typer.echo(f"report: {path}")


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="Model file written by `featx fit --model`.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched below).")],
    out: Annotated[
        Path | None, typer.Option(help="CSV file to write (default: print the CSV).")
    ] = None,
    top_k: Annotated[
        int, typer.Option(help="Best classes listed per image.", callback=AT_LEAST_ONE)
    ] = 3,
    batch_size: BatchSizeOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    workers: Annotated[
        int, typer.Option(help="Decoding processes (0: in-process).", callback=NOT_NEGATIVE)
    ] = 0,
    tta: Annotated[
        int,
        typer.Option(
            help="Test-time augmentation: also score N augmented views and average.",
            callback=NOT_NEGATIVE,
        ),
    ] = 0,
    engine: EngineOption = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress bar or engine line.")] = False,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            help="Also load a pickle-based model file from an older featx; unpickling runs "
            "code stored in the file: only for files you trust."
        ),
    ] = False,
) -> None:
    """Classify images with a model: runs the backbone, layer and preprocessing the model
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
    if result.skipped:
        _echo_err(f"{len(result.skipped)} file(s) could not be read and were skipped:")
        for path, reason in result.skipped:
            _echo_err(f"  {path}: {reason}")
        raise typer.Exit(EXIT_SKIPPED)


@app.command()
def classifiers() -> None:
    """List the classifiers `featx fit --clf` accepts ("stream": can train out-of-core).

    Example: featx classifiers
    """
    from featx.classify.registry import classifier_table

    typer.echo(classifier_table())


# ---- fine-tuning stage: finetune, lr-find, augment-preview ---------------------------------


def _finetune_config(network: dict[str, Any], augmentation: AugmentFlags, **training):
    """A FinetuneConfig from the shared options; returns it with (workers, device)."""
    from featx.errors import UsageError
    from featx.finetuning.config import FINETUNE_AUGMENT, FinetuneConfig

    network = dict(network)
    workers, device, augment = network.pop("workers"), network.pop("device"), network.pop("augment")
    if not augment and augmentation.given:
        raise UsageError("augmentation settings were given together with --no-augment.")
    settings = augmentation.config(default=True, base=FINETUNE_AUGMENT) if augment else None
    config = FinetuneConfig(**network, **training, augment=settings)
    return config, workers, device


@app.command()
@with_augmentation
@with_network
def finetune(
    data_dir: Annotated[
        Path, typer.Argument(help="Image folder: DATA/CLASS/ or DATA/{train,validation}/CLASS/.")
    ],
    network: dict,
    augmentation: AugmentFlags,
    epochs_head: Annotated[
        int | None,
        typer.Option(
            help="Epochs of stage 1, base frozen (default 5; 1 with --head MODEL; with "
            "--store up to 100 on the cached rows, 0 with --head MODEL).",
            callback=NOT_NEGATIVE,
        ),
    ] = None,
    epochs: Annotated[
        int,
        typer.Option(
            help="Epochs of stage 2, unfrozen from --unfreeze-from.", callback=NOT_NEGATIVE
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
            callback=NOT_NEGATIVE,
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
    quiet: Annotated[bool, typer.Option(help="No progress bars or per-epoch lines.")] = False,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            help="Also load a --head model file that is a pickle from an older featx; "
            "unpickling runs code stored in the file: only for files you trust."
        ),
    ] = False,
) -> None:
    """Fine-tune BACKBONE on DATA_DIR: train a new head on the frozen base (on a store's
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
            command=_command_line(),
            trust_pickle=trust_pickle,
            store=store,
        )
    typer.echo(str(result.out))
    if result.skipped:
        _echo_err(f"{len(result.skipped)} file(s) could not be read and were skipped:")
        for path, reason in result.skipped[:20]:
            _echo_err(f"  {path}: {reason}")
        raise typer.Exit(EXIT_SKIPPED)


@app.command("lr-find")
@with_augmentation
@with_network
def lr_find(
    data_dir: Annotated[
        Path, typer.Argument(help="Image folder: DATA/CLASS/ or DATA/{train,validation}/CLASS/.")
    ],
    network: dict,
    augmentation: AugmentFlags,
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
        int, typer.Option(help="Steps of the sweep (at most).", callback=AT_LEAST_ONE)
    ] = 100,
    out: Annotated[Path, typer.Option(help="PNG file for the loss curve.")] = Path("lr-find.png"),
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
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
    n: Annotated[int, typer.Option(help="Augmented views per image.", callback=AT_LEAST_ONE)] = 9,
    images: Annotated[
        int,
        typer.Option(
            help="Images picked from a folder (one per class first).", callback=AT_LEAST_ONE
        ),
    ] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the picks and the views.")] = 0,
    tile: Annotated[int, typer.Option(help="Tile size in pixels.", callback=IMAGE_SIZE)] = 160,
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("preview.png"),
) -> None:
    """Write a grid of augmented versions of images (each original first) to see what the
    augmentation settings do; the settings are stored in the PNG.

    Example: featx augment-preview data/flowers --n 9 --rotation 20 --zoom 0.1 --out preview.png
    """
    from featx.data.preview import augment_preview as run

    with reported():
        config = augmentation.config(default=True)
        path = run(source, config, out=out, n=n, images=images, seed=seed, tile=tile)
    typer.echo(str(path))


if __name__ == "__main__":
    app()
