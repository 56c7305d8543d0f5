"""The functions behind `featx runs` and `featx report`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from featx.errors import UsageError
from featx.report.page import DEFAULT_BEST, write_report
from featx.report.table import format_runs
from featx.runlog import LOG_SUFFIX, Run, find_logs, read_runs
from featx.runtime import check_output_file

__all__ = ["report_command", "runs_command", "runs_from_paths"]


def runs_from_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """The runs of `paths`, each a store or its `.runs.sqlite` log; with none, every log under
    ./stores. No log anywhere is an error."""
    if not paths:
        if not find_logs():
            raise UsageError(
                "No run logs (*.runs.sqlite) under ./stores; pass store files or their logs."
            )
        return read_runs()
    paths = [Path(p) for p in paths]
    return read_runs(
        [p for p in paths if not p.name.endswith(LOG_SUFFIX)],
        logs=[p for p in paths if p.name.endswith(LOG_SUFFIX)],
    )


def runs_command(
    stores: Sequence[str | os.PathLike[str]], fmt: str = "table", width: int | None = None
) -> str:
    """`featx runs [--store STORE|LOG]...`: the leaderboard as "table" (columns chosen to fit
    `width`, by default the terminal's), "wide", "json" or "csv"."""
    return format_runs(runs_from_paths(stores), fmt, width)


def report_command(
    out: str | os.PathLike[str],
    stores: Sequence[str | os.PathLike[str]],
    best: int = DEFAULT_BEST,
) -> Path:
    """`featx report FILE [--store STORE|LOG]...`: write the HTML report, with full sections
    for each store's `best` best runs; no runs is an error."""
    out = Path(out)
    check_output_file("", out)
    runs = runs_from_paths(stores)
    if not runs:
        raise UsageError("No runs are logged for the given stores yet; nothing to report.")
    return write_report(out, runs, best=best)
