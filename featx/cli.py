"""The `featx` command line: thin typer commands over the library.

Exit codes: 0 done; 2 bad input (usage, data, weights, store mismatch, store locked);
3 done, but some image files could not be read and were skipped; 130 interrupted (resumable).
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from featx.errors import EXIT_SKIPPED, FeatxError

app = typer.Typer(
    help="Extract frozen-backbone features once into HDF5 stores; train classifiers on them.\n\n"
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
def extract(
    data_dir: Annotated[
        Path,
        typer.Argument(
            help="Image folder: DATA/CLASS/*.jpg or DATA/{train,validation,test}/CLASS/*.jpg."
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
    augment_config: Annotated[
        Path | None,
        typer.Option(help="TOML/JSON/YAML file with augmentation ranges (with --augment)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the augmented views.")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a store that was made differently.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar or messages.")] = False,
) -> None:
    """Run BACKBONE over DATA_DIR once and store the chosen layers' features.

    Re-running resumes an interrupted run, reuses layers already stored, and adds new ones.

    Example: featx extract data/flowers --backbone vgg16 --layer block4_pool --layer block5_pool
    """
    from featx.extract import extract as run

    with reported():
        config = None
        if augment_config is not None:
            from featx.augment import AugmentConfig

            config = AugmentConfig.from_file(augment_config)
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
    from featx.layers import layer_table

    with reported():
        typer.echo(layer_table(backbone, image_size, n_images, all_layers))


@app.command()
def backbones() -> None:
    """List the built-in backbones.

    Example: featx backbones
    """
    from featx.backbones import available_backbones

    for name in available_backbones():
        typer.echo(name)
    typer.echo("timm:NAME  (any timm model)")


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A feature store (.h5).")],
) -> None:
    """Show what a store holds: layers, rows per split and class, skipped files, provenance.

    Example: featx info stores/flowers-vgg16-default-std.h5
    """
    from featx.store import FeatureStore

    with reported(), FeatureStore(path) as store:
        typer.echo(store.summary())


# ---- classifier stage: fit, evaluate, predict ----------------------------------------------


# ---- fine-tuning stage: finetune, lr-find, augment-preview ---------------------------------


if __name__ == "__main__":
    app()
