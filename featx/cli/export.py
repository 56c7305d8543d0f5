"""`featx export`: a store layer as embedding files for embedding-reader, autofaiss and
clip-retrieval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featx.cli.app import app, reported

__all__ = ["export"]


@app.command()
def export(
    store: Annotated[
        Path, typer.Argument(help="Feature store written by `featx extract`.", metavar="STORE")
    ],
    out: Annotated[Path, typer.Argument(help="The folder to write.", metavar="OUT/")],
    layer: Annotated[str, typer.Option(help="The layer to export (`featx info` lists them).")],
    format: Annotated[  # noqa: A002 - the option's name
        str,
        typer.Option(
            help="npy: OUT/emb/img_emb_0000.npy with OUT/metadata/metadata_0000.parquet; "
            "parquet: OUT/emb/img_emb_0000.parquet with an `embedding` column.",
        ),
    ] = "npy",
    split: Annotated[
        str | None, typer.Option(help="Export one split's rows only. Default: every row.")
    ] = None,
    rows_per_file: Annotated[int, typer.Option(help="Rows per embedding file.", min=1)] = 1_000_000,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT when it exists and is not empty.")
    ] = False,
) -> None:
    """Write a store layer's features as embedding files with a metadata parquet (path, label,
    split), the layout embedding-reader, autofaiss and clip-retrieval read.

    Example: featx export stores/flowers.h5 --layer avgpool --format npy exports/flowers/
    """
    from featx.store.export import export as run

    with reported():
        result = run(store, out, layer, format, split=split, rows_per_file=rows_per_file,
                     overwrite=overwrite)  # fmt: skip
    typer.echo(f"Exported {result.n_rows} rows of {result.dim} values to {result.out}.")
