"""`featx runs` output: a leaderboard that fits the terminal (columns chosen by width), every
column (`wide`), or every field of every run (each probed layer too) as JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from featx.errors import check_choice
from featx.report.probes import collapse
from featx.runlog import Run, ranked

__all__ = ["FORMATS", "format_runs", "leaderboard"]

FORMATS = ("table", "wide", "json", "csv")
DEFAULT_WIDTH = 100
MIN_PARAMS = 12
GAP = "  "


@dataclass(frozen=True)
class Column:
    name: str
    cell: Callable[[int, Run], str]
    priority: int  # lower is kept first when the terminal is narrow
    numeric: bool = False


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def params_text(run: Run) -> str:
    """The run's parameters as `k=v, ...`."""
    return ", ".join(f"{k}={_short(v)}" for k, v in run.params.items()) or "-"


def _clean(text: str) -> str:
    """One line of printable text: control characters (escape codes, newlines) shown as '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


COLUMNS = (
    Column("rank", lambda i, r: str(i), 0, numeric=True),
    Column("run", lambda i, r: r.key, 1),
    Column("kind", lambda i, r: r.kind, 6),
    Column("store", lambda i, r: r.store.name, 10),  # also the start of the run id
    Column("layer", lambda i, r: r.layer, 4),
    Column("classifier", lambda i, r: r.classifier, 3),
    Column("params", lambda i, r: params_text(r), 5),
    Column("val acc", lambda i, r: _score(r.metric("validation", "accuracy")), 2, numeric=True),
    Column("test acc", lambda i, r: _score(r.metric("test", "accuracy")), 2, numeric=True),
    Column("macro F1", lambda i, r: _score(r.macro_f1), 7, numeric=True),
    Column("time", lambda i, r: r.time[:16].replace("T", " "), 8),
)


def _fit(widths: list[int], width: int) -> tuple[list[int], int | None]:
    """The indices of the columns that fit in `width` (by priority, kept in their order) and
    the width left for params (None when params does not fit)."""
    order = sorted(range(len(COLUMNS)), key=lambda i: COLUMNS[i].priority)
    params = next(i for i, c in enumerate(COLUMNS) if c.name == "params")
    chosen: list[int] = []
    used = -len(GAP)
    for i in order:
        need = (MIN_PARAMS if i == params else widths[i]) + len(GAP)
        if used + need <= width or not chosen:
            chosen.append(i)
            used += need
    room = min(widths[params], MIN_PARAMS + width - used) if params in chosen else None
    return sorted(chosen), room


def leaderboard(runs: Iterable[Run], width: int | None = None, *, wide: bool = False) -> str:
    """A text table of the runs, best validation accuracy (else test accuracy) first, within
    `width` columns (default: the terminal's, 100 when unknown); `wide` keeps every column
    and the whole params. A probe call is one row, its best layer."""
    order = [run for run, _ in collapse(runs)]
    if not order:
        return "No runs logged."
    rows = [[_clean(c.cell(i, r)) for c in COLUMNS] for i, r in enumerate(order, 1)]
    table = [[c.name for c in COLUMNS], *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    chosen = list(range(len(COLUMNS)))
    if not wide:
        if width is None:
            width = shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
        chosen, room = _fit(widths, width)
        params = [c.name for c in COLUMNS].index("params")
        if room is not None and room < widths[params]:
            for row in rows:
                if len(row[params]) > room:
                    row[params] = row[params][: room - 3] + "..."
            widths[params] = room
    lines = [
        GAP.join(
            row[i].rjust(widths[i]) if COLUMNS[i].numeric else row[i].ljust(widths[i])
            for i in chosen
        ).rstrip()
        for row in table
    ]
    lines.insert(1, GAP.join("-" * widths[i] for i in chosen))
    return "\n".join(lines)


def _record(rank: int, run: Run) -> dict[str, Any]:
    return {
        "rank": rank,
        "run": run.key,
        "id": run.id,
        "log": str(run.log),
        "time": run.time,
        "kind": run.kind,
        "store": str(run.store),
        "layer": run.layer,
        "classifier": run.classifier,
        "val_accuracy": run.metric("validation", "accuracy"),
        "test_accuracy": run.metric("test", "accuracy"),
        "macro_f1": run.macro_f1,
        "params": run.params,
        "settings": run.settings,
        "scores": run.scores,
        "details": run.details,
        "model_path": run.model_path,
        "command": run.command,
        "host": run.host,
        "pid": run.pid,
        "featx_version": run.featx_version,
        "meta": run.meta,
    }


def _strict(value: Any) -> Any:
    """Non-finite floats (which a log may hold) as null, so the output is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _csv_cell(value: Any) -> Any:
    """A CSV cell: containers as JSON; text that a spreadsheet would run as a formula
    (starting with = + - @, a tab or a carriage return) prefixed with '."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        value = json.dumps(value, default=str)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def format_runs(runs: Sequence[Run], fmt: str = "table", width: int | None = None) -> str:
    """The runs as `fmt`: "table" (fits `width`), "wide" (every column), "json" (a list of
    every field of every run) or "csv" (one row per run, containers as JSON)."""
    check_choice("format", fmt, FORMATS)
    if fmt in ("table", "wide"):
        return leaderboard(runs, width, wide=fmt == "wide")
    records = [_record(i, r) for i, r in enumerate(ranked(runs), 1)]
    if fmt == "json":
        return json.dumps(_strict(records), indent=1, default=str)
    out = io.StringIO()
    fields = list(records[0]) if records else ["rank", "run"]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields)
    for record in records:
        writer.writerow([_csv_cell(record[k]) for k in fields])
    return out.getvalue().rstrip("\n")
