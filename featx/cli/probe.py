"""`featx probe`: how well every stored layer transfers, by the field's fixed protocols."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featx.classify.probe_settings import ProbeSettings
from featx.cli.app import app, command_line, echo_err, fail, reported
from featx.cli.declare import from_settings, in_range
from featx.errors import FeatxError
from featx.settings import DATA, TRAINING

__all__ = ["probe"]


def _shots(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> list[int]:
    """--shots 1,5,10: whole numbers of labelled images per class, in increasing order."""
    if not value or ctx.resilient_parsing:
        return []
    try:
        shots = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        raise fail(f"--shots must be whole numbers separated by commas, not {value!r}.") from None
    if not shots or shots[0] < 1 or shots[-1] > 1_000_000:
        raise fail(f"--shots must be from 1 to 1000000 images per class, not {value!r}.")
    return shots


def _size(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> int | None:
    """--memory-budget 4GB: a finite size above 0, at most 1 PiB."""
    if value is None or ctx.resilient_parsing:
        return None
    from featx.runtime import parse_size

    try:
        size = parse_size(value)
    except FeatxError as error:
        raise fail(f"--memory-budget: {error}") from None
    except (OverflowError, ValueError):
        size = 0
    if not 0 < size <= 2**50:
        raise fail(f"--memory-budget must be a size above 0 and at most 1 PiB, not {value!r}.")
    return size


@app.command()
@from_settings(ProbeSettings, exclude=("shots", "memory_budget", "chunk_bytes"))
def probe(
    settings: ProbeSettings,
    store: Annotated[Path, typer.Option(help="Feature store written by `featx extract`.")],
    shots: Annotated[
        str | None,
        typer.Option(
            help="Few-shot: labelled images per class, e.g. 1,5,10; each K is drawn --tries "
            "times (seeded, by source image) and reported as mean ± std.",
            callback=_shots,
            rich_help_panel=TRAINING,
            metavar="K,...",
        ),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Memory for one layer's features, e.g. 4GB; a larger layer streams from the "
            "store. Default: half of what is free.",
            callback=_size,
            rich_help_panel=DATA,
        ),
    ] = None,
    chunk_mb: Annotated[
        float,
        typer.Option(
            help="Rows read at a time when streaming, in MB of float32.",
            callback=in_range(0, 1e6, above=True),
            rich_help_panel=DATA,
        ),
    ] = 64.0,
    quiet: Annotated[bool, typer.Option(help="No progress lines.")] = False,
) -> None:
    """Probe every stored layer: which one transfers best.

    linear (default): multinomial logistic regression, C over logspace(-6, 5, 45) chosen on
    the validation rows (the store's validation split, else a stratified 20% of the training
    images), refit on training + validation rows and scored on the test split. Reports the
    chosen C, validation accuracy along the path, test accuracy, mean per-class accuracy,
    top-5, calibration error before and after temperature scaling. Each layer is appended to
    the store's run log.

    Example: featx probe --store stores/fashion.h5 --shots 1,5,10 --report probe.json
    --save-best fashion.featx
    """
    from featx.classify.probing import probe as run

    with reported():
        result = run(
            store,
            settings,
            shots=shots,
            memory_budget=memory_budget,
            chunk_bytes=int(chunk_mb * 1e6),
            command=command_line(),
            progress=None if quiet else echo_err,
        )
    typer.echo(result.table())
    if settings.save_best is not None:
        typer.echo(f"\nmodel: {settings.save_best} ({result.best.layer})")
    if settings.report is not None:
        typer.echo(f"report: {settings.report}")
