"""One self-contained HTML report of logged runs (`featx report`), and the plain functions
behind `featx runs` and `featx report`.

The page needs no network: CSS and the few lines of JavaScript that sort the leaderboard are
inline, charts are inline SVG drawn here (so matplotlib is not needed), and the augmentation
preview is embedded as a base64 PNG. Every piece of logged text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from featx import __version__
from featx.errors import UsageError
from featx.runlog import (
    LEADERBOARD_COLUMNS,
    LOG_SUFFIX,
    Run,
    find_logs,
    leaderboard,
    leaderboard_rows,
    ranked,
    read_runs,
)

__all__ = ["report_command", "runs_command", "runs_from_paths", "write_report"]

SPLITS = ("validation", "test")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
NUMERIC_COLUMNS = {"rank", "val acc", "test acc", "macro F1"}

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 2em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#leaderboard th { cursor: pointer; background: #f0f0f0; user-select: none; }
#leaderboard th[aria-sort="ascending"]::after { content: " \\25B2"; }
#leaderboard th[aria-sort="descending"]::after { content: " \\25BC"; }
table.cm td { text-align: right; min-width: 2.5em; }
table.cm th.pred { writing-mode: vertical-rl; transform: rotate(180deg); }
section.run { border-top: 2px solid #888; }
code, pre { background: #f6f6f6; } pre { padding: 4px; white-space: pre-wrap; }
svg text { font: 11px system-ui, sans-serif; }
img.preview { max-width: 100%; border: 1px solid #ccc; }
.muted { color: #777; }
"""

# Clicking a header sorts by that column: numbers (data-value) numerically, text otherwise;
# a second click reverses. Rows without a value ("-") go last either way.
SORT_JS = """
document.querySelectorAll("#leaderboard th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col], y = b.cells[col];
      var u = x.dataset.value, v = y.dataset.value;
      if (u !== undefined || v !== undefined) {
        if (u === "") return 1; if (v === "") return -1;
        return dir * (parseFloat(u) - parseFloat(v));
      }
      return dir * x.textContent.localeCompare(y.textContent);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else _e(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if value and abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def _table(
    rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None, cls: str = ""
) -> str:
    """A table of escaped text cells; numbers are right-aligned."""
    out = [f'<table class="{_e(cls)}">' if cls else "<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for cell in row:
            if cell is None or isinstance(cell, int | float) and not isinstance(cell, bool):
                cells.append(f'<td class="num">{_num(cell)}</td>')
            else:
                cells.append(f"<td>{_e(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _plain(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return "-" if value is None else str(value)


# ---- charts ---------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_text(value: float, log: bool) -> str:
    if log:
        return f"1e{round(value)}"
    return f"{value:.3g}"


def _svg_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float | None]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    marks: Sequence[tuple[float, str]] = (),
    width: int = 460,
    height: int = 280,
) -> str:
    """An inline SVG line chart: one polyline per (label, xs, ys) series, a legend, axes with
    ticks, and dashed vertical lines at `marks` (x, label). Points that are None or not finite
    (and x <= 0 on a log axis) are left out."""
    left, right, top, bottom = 58, 12, 40, 40
    pw, ph = width - left - right, height - top - bottom

    def tx(x: float) -> float:
        return math.log10(x) if log_x else x

    points = [
        [
            (tx(x), y)
            for x, y in zip(xs, ys, strict=False)
            if _finite(x) and _finite(y) and (not log_x or x > 0)
        ]
        for _, xs, ys in series
    ]
    every = [p for s in points for p in s]
    parts = [
        f'<svg width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
        f'<text x="{width / 2}" y="15" text-anchor="middle" font-weight="bold">{_e(title)}</text>',
    ]
    if not every:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>')
        return "\n".join([*parts, "</svg>"])
    x0, x1 = min(p[0] for p in every), max(p[0] for p in every)
    y0, y1 = min(p[1] for p in every), max(p[1] for p in every)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts.append(
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>'
    )
    if log_x:  # whole decades, at most about eight of them
        decades = list(range(math.ceil(x0), math.floor(x1) + 1))
        xticks = [float(d) for d in decades[:: max(1, math.ceil(len(decades) / 8))]]
    else:
        xticks = [t for t in _ticks(x0, x1) if x0 <= t <= x1]
    for t in xticks:
        parts.append(
            f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>'
            f'<text x="{px(t):.1f}" y="{top + ph + 14}" text-anchor="middle">'
            f"{_e(_tick_text(t, log_x))}</text>"
        )
    for t in _ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(
                f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                f'stroke="#eee"/><text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">'
                f"{_e(_tick_text(t, False))}</text>"
            )
    parts.append(
        f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{_e(xlabel)}</text>'
        f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
        f"{_e(ylabel)}</text>"
    )
    for x, label in marks:
        if _finite(x) and (not log_x or x > 0) and x0 <= tx(x) <= x1:
            X = px(tx(x))
            parts.append(
                f'<line x1="{X:.1f}" x2="{X:.1f}" y1="{top}" y2="{top + ph}" stroke="#555" '
                f'stroke-dasharray="4 3"/>'
                f'<text x="{X + 3:.1f}" y="{top + ph - 5}">{_e(label)}</text>'
            )
    for i, ((label, _, _), pts) in enumerate(zip(series, points, strict=True)):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        if len(pts) == 1:
            parts.append(
                f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{color}"/>'
            )
        elif pts:
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"/>'
            )
        lx = left + 100 * i  # the legend is one row between the title and the plot
        parts.append(
            f'<line x1="{lx}" x2="{lx + 18}" y1="{top - 12}" y2="{top - 12}" '
            f'stroke="{color}" stroke-width="2"/><text x="{lx + 22}" y="{top - 8}">'
            f"{_e(label)}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _history_charts(history: list[dict[str, Any]]) -> str:
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    starts = [
        (h["epoch"] - 0.5, "unfrozen")
        for h in history
        if h.get("stage") == "full" and h.get("stage_epoch") == 1 and h.get("epoch", 1) > 1
    ]
    charts = []
    for metric in ("accuracy", "loss"):
        series = [
            (name, epochs, [h.get(f"{prefix}_{metric}") for h in history])
            for prefix, name in (("train", "training"), ("val", "validation"))
            if any(f"{prefix}_{metric}" in h for h in history)
        ]
        if series:
            charts.append(
                _svg_chart(series, title=metric, xlabel="epoch", ylabel=metric, marks=starts)
            )
    return "\n".join(charts)


def _lr_chart(curve: dict[str, Any]) -> str:
    lrs = curve.get("lrs") or []
    series = [("loss", lrs, curve.get("losses") or [])]
    if curve.get("smoothed"):
        series.append(("smoothed", lrs, curve["smoothed"]))
    suggestion = curve.get("suggestion")
    marks = [(suggestion, f"suggested {suggestion:.2g}")] if _finite(suggestion) else []
    chart = _svg_chart(
        series,
        title="learning-rate range test",
        xlabel="learning rate",
        ylabel="loss",
        log_x=True,
        marks=marks,
    )
    note = f"<p>Suggested learning rate: <b>{_e(_num(suggestion))}</b></p>" if marks else ""
    return chart + note


# ---- tables ---------------------------------------------------------------------------------


def _confusion_matrix(matrix: list[list[int]], names: list[str]) -> str:
    """A heat-map table: rows are true classes, columns predictions, shaded by row share."""
    names = (
        list(names) if names and len(names) == len(matrix) else [str(i) for i in range(len(matrix))]
    )
    out = ['<table class="cm"><tr><th>true \\ predicted</th>']
    out += [f'<th class="pred">{_e(n)}</th>' for n in names]
    out.append("</tr>")
    for i, (name, row) in enumerate(zip(names, matrix, strict=True)):
        total = sum(row) or 1
        cells = []
        for j, count in enumerate(row):
            share = count / total
            hue = 210 if i == j else 0  # blue on the diagonal, red off it
            light = 100 - 55 * share
            fg = "#fff" if light < 60 else "#000"
            cells.append(
                f'<td style="background:hsl({hue},70%,{light:.0f}%);color:{fg}" '
                f'title="{_e(name)} as {_e(names[j])}: {_e(count)}">{_e(count)}</td>'
            )
        out.append(f"<tr><th>{_e(name)}</th>{''.join(cells)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _per_class(per_class: dict[str, dict[str, Any]]) -> str:
    columns = ["precision", "recall", "f1", "support"]
    rows = [[name, *(m.get(c) for c in columns)] for name, m in per_class.items()]
    return _table(rows, ["class", *columns])


def _split_details(run: Run, split: str) -> dict[str, Any]:
    """Per-class table and confusion matrix of a split, from details (or scores, for logs
    written without record_run's separation)."""
    found: dict[str, Any] = {}
    for source in (run.scores.get(split), run.details.get(split)):
        if isinstance(source, dict):
            found |= {
                k: source[k]
                for k in ("per_class", "confusion_matrix", "class_names")
                if k in source
            }
    if split == "validation" and "confusion_matrix" in run.details:  # top-level blobs
        found.setdefault("confusion_matrix", run.details["confusion_matrix"])
        found.setdefault("per_class", run.details.get("per_class"))
        found.setdefault("class_names", run.details.get("class_names"))
    return {k: v for k, v in found.items() if v}


def _png_data_uri(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _run_section(run: Run, store_ids: dict[Path, str]) -> str:
    out = [f'<section class="run" id="run-{_e(run.key)}">']
    out.append(
        f"<h2>{_e(run.kind)} run {_e(run.key)}: {_e(run.classifier)} on {_e(run.layer)}</h2>"
    )
    info = [
        ("time", run.time),
        ("store", run.store),
        ("host / pid", f"{run.host} / {run.pid}"),
        ("featx", run.featx_version),
        ("model", run.model_path or "-"),
        ("command", run.command or "-"),
    ]
    out.append(_table(info))
    if run.store in store_ids:
        out.append(f'<p>Provenance: <a href="#{store_ids[run.store]}">{_e(run.store.name)}</a></p>')
    if run.settings:
        out.append("<h3>Settings</h3>")
        out.append(_table([(k, _plain(v)) for k, v in run.settings.items()]))
    splits = [s for s in run.scores if isinstance(run.scores[s], dict)]
    if splits:
        names = sorted(
            {k for s in splits for k, v in run.scores[s].items() if not isinstance(v, dict | list)}
        )
        out.append("<h3>Scores</h3>")
        out.append(
            _table(
                [[n, *(run.scores[s].get(n) for s in splits)] for n in names], ["metric", *splits]
            )
        )
    for split in dict.fromkeys([*SPLITS, *splits]):
        found = _split_details(run, split)
        if found.get("per_class"):
            out.append(f"<h3>Per-class metrics ({_e(split)})</h3>")
            out.append(_per_class(found["per_class"]))
        if found.get("confusion_matrix"):
            out.append(f"<h3>Confusion matrix ({_e(split)})</h3>")
            out.append(_confusion_matrix(found["confusion_matrix"], found.get("class_names", [])))
    history = run.details.get("history")
    if isinstance(history, list) and history:
        out.append("<h3>Training history</h3>")
        out.append(f'<div class="chart history">{_history_charts(history)}</div>')
    curve = run.details.get("lr_find")
    if isinstance(curve, dict) and curve.get("lrs"):
        out.append("<h3>Learning-rate finder</h3>")
        out.append(f'<div class="chart lr-find">{_lr_chart(curve)}</div>')
    preview = run.details.get("augment_preview")
    if preview:
        out.append("<h3>Augmentation preview</h3>")
        uri = _png_data_uri(Path(preview))
        if uri:
            out.append(f'<img class="preview" alt="augmentation preview" src="{uri}">')
        else:
            out.append(f'<p class="muted">Preview {_e(preview)} is missing or not a PNG.</p>')
    out.append("</section>")
    return "\n".join(out)


def _provenance(store: Path, meta: dict[str, Any] | None, anchor: str) -> str:
    out = [f'<section class="store" id="{anchor}"><h2>Store {_e(store.name)}</h2>']
    if not meta:
        out.append(
            f'<p class="muted">{_e(store)}: no provenance was readable when its runs '
            f"were logged.</p></section>"
        )
        return "\n".join(out)
    dataset = meta.get("dataset") or {}
    rows = [
        ("path", store),
        ("backbone", meta.get("backbone")),
        ("weights", meta.get("weights")),
        ("weights sha256", meta.get("weights_sha256")),
        ("preprocessing", meta.get("preprocessing_text") or _plain(meta.get("preprocessing"))),
        ("dataset", dataset.get("root")),
        ("dataset fingerprint", dataset.get("fingerprint")),
        ("dataset files", dataset.get("n_files")),
        ("augmentation", _plain(meta.get("augment"))),
        ("created", meta.get("created")),
    ]
    out.append(_table([(k, "-" if v is None else str(v)) for k, v in rows]))
    versions = meta.get("versions") or {}
    if versions:
        out.append("<h3>Versions</h3>")
        out.append(_table(sorted(versions.items()), ["library", "version"]))
    history = meta.get("history") or []
    if history:
        out.append("<h3>History</h3>")
        out.append(
            _table(
                [(h.get("time"), h.get("command"), _plain(h.get("layers"))) for h in history],
                ["time", "command", "layers"],
            )
        )
    out.append("</section>")
    return "\n".join(out)


def _leaderboard_html(runs: list[Run]) -> str:
    order = ranked(runs)
    rows = leaderboard_rows(order)
    value_columns = {
        "rank": None,
        "val acc": ("validation", "accuracy"),
        "test acc": ("test", "accuracy"),
    }
    out = ['<table id="leaderboard"><thead><tr>']
    out += [f'<th scope="col">{_e(c)}</th>' for c in LEADERBOARD_COLUMNS]
    out.append("</tr></thead><tbody>")
    for run, row in zip(order, rows, strict=True):
        cells = []
        for column, text in zip(LEADERBOARD_COLUMNS, row, strict=True):
            if column in NUMERIC_COLUMNS:
                if column == "rank":
                    value: float | None = float(text)
                elif column == "macro F1":
                    value = run.macro_f1
                else:
                    value = run.metric(*value_columns[column])
                data = "" if value is None else repr(value)
                cells.append(f'<td class="num" data-value="{_e(data)}">{_e(text)}</td>')
            elif column == "run":
                cells.append(f'<td><a href="#run-{_e(run.key)}">{_e(text)}</a></td>')
            else:
                cells.append(f"<td>{_e(text)}</td>")
        out.append(f'<tr data-run="{_e(run.key)}">{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def write_report(out: str | os.PathLike[str], runs: Sequence[Run]) -> Path:
    """Write one self-contained HTML page about `runs` to `out` and return its path."""
    out = Path(out)
    runs = list(runs)
    stores: dict[Path, dict[str, Any] | None] = {}
    for run in sorted(runs, key=lambda r: r.time):  # the newest run's snapshot wins
        stores[run.store] = run.meta or stores.get(run.store)
    store_ids = {store: f"store-{i + 1}" for i, store in enumerate(stores)}
    body = [
        "<h1>featx experiment report</h1>",
        f'<p class="muted">{len(runs)} runs on {len(stores)} stores; written by featx '
        f"{_e(__version__)}. Click a column header to sort.</p>",
        "<h2>Leaderboard</h2>",
        _leaderboard_html(runs),
        *(_run_section(run, store_ids) for run in ranked(runs)),
        *(_provenance(store, meta, store_ids[store]) for store, meta in stores.items()),
    ]
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>featx report</title>",
            f"<style>{CSS}</style></head><body>",
            *body,
            f"<script>{SORT_JS}</script>",
            "</body></html>",
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


# ---- CLI glue -------------------------------------------------------------------------------


def runs_from_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """The runs of `paths`, each a store or its `.runs.sqlite` log; with none, every log under
    ./stores. No log anywhere is an error."""
    if not paths:
        logs = find_logs()
        if not logs:
            raise UsageError(
                "No run logs (*.runs.sqlite) under ./stores; pass store files or their logs."
            )
        return read_runs(logs=logs)
    paths = [Path(p) for p in paths]
    return read_runs(
        [p for p in paths if not p.name.endswith(LOG_SUFFIX)],
        logs=[p for p in paths if p.name.endswith(LOG_SUFFIX)],
    )


def runs_command(stores: Sequence[str | os.PathLike[str]]) -> str:
    """`featx runs [--store STORE|LOG]...`: the leaderboard text."""
    return leaderboard(runs_from_paths(stores))


def report_command(out: str | os.PathLike[str], stores: Sequence[str | os.PathLike[str]]) -> Path:
    """`featx report FILE [--store STORE|LOG]...`: write the HTML report; no runs is an error."""
    runs = runs_from_paths(stores)
    if not runs:
        raise UsageError("No runs are logged for the given stores yet; nothing to report.")
    return write_report(out, runs)
