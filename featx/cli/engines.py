"""`featx engines`: the engines measured on this machine for one network."""

from __future__ import annotations

from typing import Annotated

import typer

from featx.cli.app import app, echo_err, reported
from featx.cli.declare import from_settings
from featx.extraction.settings import ExtractSettings

__all__ = ["engines"]


@app.command()
@from_settings(
    ExtractSettings,
    None,
    only=("backbone", "layers", "weights", "image_size", "pool", "precision", "batch_size",
          "device"),
)  # fmt: skip
def engines(
    backbone: str | None,
    layers: list[str],
    weights: str,
    image_size: int | None,
    pool: str,
    precision: str,
    batch_size: int | None,
    device: str,
    remeasure: Annotated[
        bool, typer.Option(help="Measure again instead of showing the cached table.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """Measure every engine on this machine for a network: images/s of the network alone on
    a random batch, set-up, set-up from featx's cache, and the largest difference to eager
    fp32's features. bf16 and int8 rows appear where the CPU has units for them (avx512_bf16
    or AMX; VNNI); the precision of a run stays --precision's.

    Example: featx engines --backbone resnet50 --layer layer3 --image-size 224
    """
    from featx.inference.table import measure_engines

    with reported():
        text = measure_engines(
            backbone, layers, weights=weights, image_size=image_size, pool=pool,
            precision=precision, batch_size=batch_size, device=device, remeasure=remeasure,
            log=(lambda _: None) if quiet else echo_err,
        )  # fmt: skip
    typer.echo(text)
