"""The `featx` command line: thin typer commands over the library.

Exit codes: 0 done; 2 bad input (usage, data, weights, store mismatch, store locked);
3 done, but some image files could not be read and were skipped; 130 interrupted (resumable).
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from featx.cli.options import AugmentFlags, with_augmentation, with_network
from featx.errors import EXIT_SKIPPED, FeatxError, UsageError

app = typer.Typer(
    help="Extract frozen-backbone features once into HDF5 stores; train classifiers on them.\n\n"
    "Example: featx extract data/flowers --backbone vgg16 --layer block4_pool, then\n\n"
    "featx fit --store stores/flowers-vgg16-default-std.h5 --layer block4_pool --clf logreg\n\n"
    "Exit codes: 0 ok, 2 bad input, 3 finished with skipped image files, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@contextlib.contextmanager
def reported():
    """Turn library errors into one line on stderr and their exit code."""
    try:
        yield
    except FeatxError as error:
        typer.echo(f"featx: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("featx: interrupted.", err=True)
        raise typer.Exit(130) from None


def _command_line() -> str:
    return "featx " + shlex.join(sys.argv[1:])


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
            "the weights' resize and crop."
        ),
    ] = None,
    pool: Annotated[
        str, typer.Option(help="Reduce spatial maps before storing: none, avg, max, avgmax.")
    ] = "none",
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32 or float16.")] = "float32",
    compression: Annotated[str, typer.Option(help="HDF5 compression: none, lzf or gzip.")] = "none",
    precision: Annotated[
        str, typer.Option(help="Compute precision: fp32, bf16 (autocast; CPU or GPU), fp16 (GPU).")
    ] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Decoding processes (default: half the cores, at most 4; 0 decodes in-process)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    augment: Annotated[
        int, typer.Option(help="Also store K augmented views of each training image.")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the augmented views.")] = 0,
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
            batch_size=batch_size,
            workers=workers,
            device=device,
            overwrite=overwrite,
            quiet=quiet,
            augment=augment,
            augment_config=config,
            seed=seed,
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
        int | None, typer.Option(help="Square input size (as extract's --image-size).")
    ] = None,
    n_images: Annotated[
        int, typer.Option(help="Dataset size for the projected store size.")
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

    A model file is a pickle: reading it runs code stored in it, so only open files you trust.

    Example: featx info stores/flowers-vgg16-default-std.h5
    """
    import h5py

    from featx.store.feature_store import FeatureStore

    with reported():
        if path.is_file() and not h5py.is_hdf5(path):
            from featx.models.file import load_model

            typer.echo(load_model(path).summary())
            return
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
        typer.Option(help="Stored layer (see `featx info STORE`); repeat to compare layers."),
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
        int | None, typer.Option(help="Reduce features to N principal components.")
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
        typer.Option(help="Stratified K-fold cross-validation grouped by source image."),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option(help="Hold-out share of images when the store has no validation split."),
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the hold-out, folds and classifiers.")] = 0,
    metric: Annotated[
        str, typer.Option(help="Ranking metric: accuracy, balanced_accuracy or f1_macro.")
    ] = "accuracy",
    model: Annotated[
        Path | None, typer.Option(help="Save the best experiment's model file (joblib) here.")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Write every experiment's metrics as JSON (plus a confusion PNG)."),
    ] = None,
    n_jobs: Annotated[
        int, typer.Option(help="Parallel jobs for grid search and rf/knn/sgd (-1: all cores).")
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
        float, typer.Option(help="Size of a row chunk when streaming, in MB of float32.")
    ] = 64.0,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """Train classifiers on stored layers: every --layer x --clf, ranked by validation score.

    Example: featx fit --store stores/flowers.h5 --layer block4_pool --layer block5_pool
    --clf logreg --clf svm --param C=0.01,0.1,1 --model flowers.joblib --report fit.json
    """
    from featx.classify.fit import fit as run
    from featx.runtime import parse_size

    with reported():
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
    store: Annotated[
        Path, typer.Option(help="Store with the model's layer, backbone and preprocessing.")
    ],
    split: Annotated[
        str, typer.Option(help="Split to score: test, validation, train or unsplit.")
    ] = "test",
    report: Annotated[
        Path | None, typer.Option(help="Write the metrics as JSON (plus a confusion PNG).")
    ] = None,
) -> None:
    """Score a model on a split of a store made with the same backbone, weights,
    preprocessing and layer (any other store is refused, saying what differs).

    Loading a model file runs code stored in it: only use model files you trust.

    Example: featx evaluate --model flowers.joblib --store stores/flowers.h5 --split test
    """
    from featx.classify.evaluate import evaluate as run

    with reported():
        result = run(model, store, split, report=report)
    typer.echo(result.table())
    if report is not None:
        typer.echo(f"\nreport: {report}, {report.with_name(f'{report.stem}-confusion.png')}")


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="Model file written by `featx fit --model`.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched below).")],
    out: Annotated[
        Path | None, typer.Option(help="CSV file to write (default: print the CSV).")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Best classes listed per image.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    workers: Annotated[int, typer.Option(help="Decoding processes (0: in-process).")] = 0,
    tta: Annotated[
        int,
        typer.Option(help="Test-time augmentation: also score N augmented views and average."),
    ] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Classify images with a model: runs the backbone, layer and preprocessing the model
    records, then its classifier; one CSV row per image with the top classes and their
    probabilities (decision scores for svm, linearsvm, ridge). Unreadable files are listed on
    stderr and skipped (exit code 3).

    Loading a model file runs code stored in it: only use model files you trust.

    Example: featx predict --model flowers.joblib photos/ --out predictions.csv
    """
    from featx.classify.predict import predict as run

    with reported():
        result = run(
            model,
            [str(p) for p in paths],
            out=out,
            top_k=top_k,
            batch_size=batch_size,
            device=device,
            workers=workers,
            tta=tta,
            quiet=quiet,
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
    from featx.finetuning.config import FinetuneConfig

    network = dict(network)
    workers, device, augment = network.pop("workers"), network.pop("device"), network.pop("augment")
    if not augment and augmentation.given:
        raise UsageError("augmentation settings were given together with --no-augment.")
    settings = augmentation.config(default=True) if augment else None
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
        typer.Option(help="Epochs of stage 1, base frozen (default 5; 1 with --head MODEL)."),
    ] = None,
    epochs: Annotated[
        int, typer.Option(help="Epochs of stage 2, unfrozen from --unfreeze-from.")
    ] = 10,
    lr: Annotated[
        float, typer.Option(help="Learning rate of the head (peak, with onecycle).")
    ] = 1e-3,
    lr_head: Annotated[
        float | None, typer.Option(help="Learning rate of the head in stage 1 (default --lr).")
    ] = None,
    schedule: Annotated[
        str, typer.Option(help="onecycle, cosine-restarts or constant.")
    ] = "onecycle",
    patience: Annotated[
        int,
        typer.Option(
            help="Stop a stage after N epochs without a better validation loss (0: never)."
        ),
    ] = 5,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default runs/<data>-<backbone>).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a finished or stopped run in --out.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars or per-epoch lines.")] = False,
) -> None:
    """Fine-tune BACKBONE on DATA_DIR: train a new head on the frozen base, then unfreeze the
    later blocks at small, layer-dependent learning rates, with augmentation throughout.

    Writes checkpoints (best.pt, last.pt), config.json, history.json/.png, metrics.json and
    model.joblib (for `featx predict` and `featx evaluate`) into the run folder.

    Example: featx finetune data/cats_dogs --backbone vgg16 --image-size 150 --unfreeze-from
    block5_conv1 --epochs-head 5 --epochs 10 --lr 1e-4 --out runs/cats-dogs
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
    start_lr: Annotated[float, typer.Option(help="First learning rate of the sweep.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="Last learning rate of the sweep.")] = 10.0,
    num_iter: Annotated[int, typer.Option(help="Steps of the sweep (at most).")] = 100,
    out: Annotated[Path, typer.Option(help="PNG file for the loss curve.")] = Path("lr-find.png"),
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Learning-rate range test: sweep the rate exponentially for a few mini-batches, plot the
    smoothed loss, stop when it diverges, and suggest the rate of steepest descent. Weights and
    optimiser state are restored afterwards.

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
        typer.echo(f"suggested learning rate: {result.suggestion:.2e}")
    lowest = f"{result.minimum:.2e}" if result.minimum is not None else "n/a"
    typer.echo(
        f"lowest smoothed loss at {lowest}; {len(result.lrs)} steps"
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
    n: Annotated[int, typer.Option(help="Augmented views per image.")] = 9,
    images: Annotated[
        int, typer.Option(help="Images picked from a folder (one per class first).")
    ] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the picks and the views.")] = 0,
    tile: Annotated[int, typer.Option(help="Tile size in pixels.")] = 160,
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
