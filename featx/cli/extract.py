"""The extraction stage: `featx extract` and `featx merge`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from featx.cli.app import app, command_line, report_skipped, reported
from featx.cli.declare import DATA_HELP, from_settings, in_range
from featx.cli.options import AugmentFlags, with_augmentation
from featx.errors import UsageError
from featx.extraction.settings import ExtractSettings
from featx.settings import SCALE_OUT

__all__ = ["extract", "merge"]


@app.command()
@with_augmentation
@from_settings(ExtractSettings, required=("backbone", "layers"))
def extract(
    data_dir: Annotated[Path, typer.Argument(help=DATA_HELP, metavar="DATA")],
    settings: ExtractSettings,
    augmentation: AugmentFlags,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Cut the rows into shards that a pool of Ray workers takes one at a time, then "
            "merge them: `local` starts a Ray instance on this machine, else the cluster's "
            "address (auto, ray://HOST:10001). Needs featx[ray].",
            metavar="ADDRESS",
            rich_help_panel=SCALE_OUT,
        ),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            help="With --ray: how many shards (work units). Default: 4 per worker, of at "
            "least 64 images each; a re-run keeps an interrupted job's count.",
            callback=in_range(1, 100_000),
            rich_help_panel=SCALE_OUT,
        ),
    ] = None,
    ray_cpus_per_shard: Annotated[
        float | None,
        typer.Option(
            help="With --ray: CPUs per worker. Default: the cluster's CPUs shared by the workers.",
            callback=in_range(0, 4096, above=True),
            rich_help_panel=SCALE_OUT,
        ),
    ] = None,
    ray_gpus_per_shard: Annotated[
        float | None,
        typer.Option(
            help="With --ray: GPUs per worker (one worker per GPU by default); refused when "
            "no node of the cluster has that many.",
            callback=in_range(0, 64),
            rich_help_panel=SCALE_OUT,
        ),
    ] = None,
) -> None:
    """Run BACKBONE over DATA once and store the chosen layers' features.

    Re-running resumes an interrupted run, reuses layers already stored, and adds new ones.

    Example: featx extract data/flowers --backbone vgg16 --layer block4_pool --layer block5_pool
    """
    with reported():
        config = augmentation.config()
        if config is not None and not settings.augment:
            raise UsageError("augmentation settings apply to augmented views; add --augment K.")
        if settings.shard is not None and not settings.shard.strip():
            raise UsageError("--shard needs I/N (e.g. 0/4) or slurm, not an empty string.")
        settings = dataclasses.replace(settings, augment_config=config, command=command_line())
        if ray is not None:
            if settings.shard:
                raise UsageError("--ray runs every shard itself; give --ray or --shard, not both.")
            from featx.extraction.distributed import extract_on_ray

            result = extract_on_ray(
                data_dir, settings, address=None if ray == "local" else ray, shards=shards,
                cpus_per_shard=ray_cpus_per_shard, gpus_per_shard=ray_gpus_per_shard,
            )  # fmt: skip
        elif shards is not None:
            raise UsageError("--shards goes with --ray; for one shard use --shard I/N.")
        else:
            from featx.extraction.run import extract as run

            result = run(data_dir, settings)
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
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an existing store at OUT that is not a merge of the same shards.",
        ),
    ] = False,
) -> None:
    """Join the shard stores of `featx extract --shard I/N` into one store.

    Example: featx merge stores/flowers.h5 stores/flowers.shard-*.h5
    """
    from featx.store.merging import merge as run

    with reported():
        path = run(out, shards, virtual=virtual, command=command_line(), overwrite=overwrite)
    typer.echo(str(path))
