"""The extraction stage: `featx extract` and `featx merge`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from featx.cli.app import app, command_line, fail, report_skipped, reported
from featx.cli.declare import IMAGE_SIZE, SEED, Shared, from_settings, in_range
from featx.cli.options import AugmentFlags, with_augmentation
from featx.errors import UsageError
from featx.settings import DATA, NETWORK, OUTPUT, SCALE_OUT

__all__ = ["extract", "merge"]

DATA_HELP = (
    "Image folder (DATA/CLASS/*.jpg or DATA/{train,validation,test}/CLASS/*.jpg) or a "
    "manifest (.csv, .tsv, .parquet with columns path, label[, split])."
)


def _shard(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    if value is not None and not value.strip() and not ctx.resilient_parsing:
        raise fail("--shard needs I/N (e.g. 0/4) or slurm, not an empty string.")
    return value


def _ray_resources(ray: str | None, gpus_per_shard: float | None) -> None:
    """Refuse GPUs per shard on a local Ray instance of a machine with too few GPUs: Ray
    would wait for them forever."""
    if ray != "local" or not gpus_per_shard:
        return
    import torch

    visible = torch.cuda.device_count()
    if visible < gpus_per_shard:
        raise UsageError(
            f"--ray-gpus-per-shard {gpus_per_shard:g} asks for more GPUs than this machine "
            f"shows ({visible}); Ray would wait for them forever."
        )


@app.command()
@with_augmentation
@from_settings(Shared, None, only=("engine", "batch_size", "workers", "device", "quiet"))
def extract(
    data_dir: Annotated[Path, typer.Argument(help=DATA_HELP, metavar="DATA")],
    backbone: Annotated[
        str,
        typer.Option(help="Backbone name (see `featx backbones`), or timm:NAME.", metavar="NAME"),
    ],
    layer: Annotated[
        list[str],
        typer.Option(
            help="Layer to store; repeat for several (one pass). See `featx layers BACKBONE`.",
            metavar="NAME",
        ),
    ],
    augmentation: AugmentFlags,
    engine: str,
    batch_size: int | None,
    workers: int | None,
    device: str,
    quiet: bool,
    store: Annotated[
        Path | None,
        typer.Option(
            help="Store file (default: in stores/, named after the data, backbone, weights "
            "and image size).",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            help="default, a named weights set (IMAGENET1K_V1), none (seeded random), "
            "or a .pth/.safetensors file.",
            rich_help_panel=NETWORK,
        ),
    ] = "default",
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Resize straight to N x N with no crop (Keras target_size) instead of "
            "the weights' resize and crop.",
            callback=IMAGE_SIZE,
            rich_help_panel=NETWORK,
        ),
    ] = None,
    pool: Annotated[
        str,
        typer.Option(
            help="Reduce spatial maps before storing: none, avg, max, avgmax.",
            rich_help_panel=OUTPUT,
        ),
    ] = "none",
    dtype: Annotated[
        str, typer.Option(help="Stored dtype: float32 or float16.", rich_help_panel=OUTPUT)
    ] = "float32",
    compression: Annotated[
        str, typer.Option(help="HDF5 compression: none, lzf or gzip.", rich_help_panel=OUTPUT)
    ] = "none",
    precision: Annotated[
        str,
        typer.Option(
            help="Compute precision: fp32, bf16 (bf16 weights; CPU or GPU), fp16 (GPU), int8 "
            "(OpenVINO post-training quantization on the CPU, calibrated on up to 300 training "
            "images chosen with --seed).",
            rich_help_panel=NETWORK,
        ),
    ] = "fp32",
    decode: Annotated[
        str | None,
        typer.Option(
            help="reduced: decode large JPEGs at a reduced size (still 2x the resize or "
            "more; 3x faster on 1600x1200 photos), or full. Default: an existing store's "
            "decoding, else reduced.",
            metavar="full|reduced",
            rich_help_panel=DATA,
        ),
    ] = None,
    augment: Annotated[
        int,
        typer.Option(
            help="Also store K augmented views of each training image.",
            callback=in_range(0, 1000),
            rich_help_panel=DATA,
        ),
    ] = 0,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the augmented views and of int8's calibration images.",
            callback=SEED,
            rich_help_panel=DATA,
        ),
    ] = 0,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace a store that was made differently.", rich_help_panel=OUTPUT
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Compute only shard I/N (0-based) of the rows into STORE.shard-IofN.h5, or "
            "`slurm` for the array task's; join the shards with `featx merge`.",
            callback=_shard,
            metavar="I/N",
            rich_help_panel=SCALE_OUT,
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run the shards as Ray tasks and merge them: `local` starts a Ray instance "
            "on this machine, else the cluster's address (auto, ray://HOST:10001). Needs "
            "featx[ray].",
            metavar="ADDRESS",
            rich_help_panel=SCALE_OUT,
        ),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            help="With --ray: how many shards. Default: one per GPU, else per CPU.",
            callback=in_range(1, 100_000),
            rich_help_panel=SCALE_OUT,
        ),
    ] = None,
    ray_cpus_per_shard: Annotated[
        float | None,
        typer.Option(
            help="With --ray: CPUs per shard task.",
            callback=in_range(0, 4096, above=True),
            rich_help_panel=SCALE_OUT,
        ),
    ] = None,
    ray_gpus_per_shard: Annotated[
        float | None,
        typer.Option(
            help="With --ray: GPUs per shard task.",
            callback=in_range(0, 64),
            rich_help_panel=SCALE_OUT,
        ),
    ] = None,
) -> None:
    """Run BACKBONE over DATA once and store the chosen layers' features.

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
            _ray_resources(ray, ray_gpus_per_shard)
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
            data_dir, backbone, layer, store=store, weights=weights, image_size=image_size,
            pool=pool, dtype=dtype, compression=compression, precision=precision, engine=engine,
            batch_size=batch_size, workers=workers, device=device, overwrite=overwrite,
            quiet=quiet, augment=augment, augment_config=config, seed=seed, decode=decode,
            command=command_line(),
        )  # fmt: skip
    typer.echo(str(result.store))
    report_skipped(result.skipped)


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="The merged store to write.")],
    shards: Annotated[
        list[Path], typer.Argument(help="Every shard store of one extraction.", metavar="SHARD")
    ],
    virtual: Annotated[
        bool,
        typer.Option(
            "--virtual",
            help="Map the shards' features in place (HDF5 virtual datasets) instead of "
            "copying them; the shard files must then stay where they are.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing store at OUT.")
    ] = False,
) -> None:
    """Join the shard stores of `featx extract --shard I/N` into one store.

    Example: featx merge stores/flowers.h5 stores/flowers.shard-*.h5
    """
    import inspect

    from featx.store.merge import merge as run

    with reported():
        options = {"virtual": virtual, "command": command_line()}
        if "overwrite" in inspect.signature(run).parameters:
            options["overwrite"] = overwrite
        elif overwrite:
            raise UsageError("--overwrite needs a featx whose merge can replace a store.")
        path = run(out, shards, **options)
    typer.echo(str(path))
