"""The HTML report page: logged runs turned into plain view data, rendered by the Jinja2
template `templates/report.html.j2` with autoescaping, and written atomically.

The page is self-contained (inline CSS, inline SVG charts, one inline script that sorts the
leaderboards and is the only script its Content-Security-Policy lets run). Runs are grouped in
one section per store; the best runs of each store get a full section, the rest are collapsed.
A probe call is one entry, its best layer, with its accuracy against depth and its other layers
under it; a store with a probe and a head or fine-tune compares them in one ladder, and stores
of one experiment on other splits compare it across them (mean ± std over the splits).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from featx import __version__
from featx.report.charts import history_chart, lr_chart, probe_chart
from featx.report.ladder import across_splits, ladder
from featx.report.probes import ProbeGroup, collapse, curve
from featx.runlog import Run, ranked
from featx.runtime import atomic_write

__all__ = ["DEFAULT_BEST", "write_report"]

DEFAULT_BEST = 3
SPLITS = ("validation", "test")
SUMMARY_PARAMS = 4
MAX_CLASSES = 200
MAX_PREVIEW_BYTES = 16 << 20

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("featx.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(value: Any, digits: int = 4) -> str:
    """A cell's text: numbers to `digits` places, None as "-", anything else as text."""
    if not _is_number(value):
        return "-" if value is None else text(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.{digits}g}" if value and abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def text(value: Any) -> str:
    """Logged values as text: JSON for containers."""
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return "-" if value is None else str(value)


def short_time(value: str) -> str:
    """`2026-11-01T10:00:00+01:00` -> `2026-11-01 10:00`."""
    return value[:16].replace("T", " ") if len(value) >= 16 and value[10:11] == "T" else value


def _summary_value(value: Any) -> str:
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}"
    if isinstance(value, list):
        return f"[{len(value)} items]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "none" if value is None else str(value)


def params_view(params: dict[str, Any]) -> dict[str, Any]:
    """A short summary of the parameters (the first few, containers as their size) and every
    parameter in full, for the leaderboard's expandable cell."""
    items = list(params.items())
    shown = [f"{k}={_summary_value(v)}" for k, v in items[:SUMMARY_PARAMS]]
    if len(items) > SUMMARY_PARAMS:
        shown.append(f"+{len(items) - SUMMARY_PARAMS} more")
    full = [(str(k), json.dumps(v, indent=1, default=str)) for k, v in items]
    return {"summary": ", ".join(shown) or "-", "full": full}


def _confusion(matrix: Any, names: Any) -> list[dict[str, Any]] | None:
    """Rows of heat-map cells (count, share of the true class, colours), or None for anything
    but a square matrix of counts."""
    if not isinstance(matrix, list) or not 0 < len(matrix) <= MAX_CLASSES:
        return None
    n = len(matrix)
    if not all(isinstance(r, list) and len(r) == n and all(map(_is_number, r)) for r in matrix):
        return None
    if not (isinstance(names, list) and len(names) == n):
        names = [str(i) for i in range(n)]
    rows = []
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        cells = []
        for j, count in enumerate(row):
            share = min(max(count / total, 0.0), 1.0) if math.isfinite(count / total) else 0.0
            light = 100 - 55 * share
            cells.append(
                {
                    "count": number(count, 0) if isinstance(count, float) else str(count),
                    "hue": 210 if i == j else 0,  # blue on the diagonal, red off it
                    "light": round(light),
                    "fg": "#fff" if light < 60 else "#000",
                    "title": f"{text(names[i])} as {text(names[j])}: {count}",
                }
            )
        rows.append({"name": text(names[i]), "cells": cells})
    return rows


def _per_class(per_class: Any) -> list[list[str]] | None:
    if not isinstance(per_class, dict) or not 0 < len(per_class) <= MAX_CLASSES:
        return None
    columns = ("precision", "recall", "f1", "support")
    return [[str(k), *(number(_dict(m).get(c)) for c in columns)] for k, m in per_class.items()]


def _splits(run: Run) -> list[dict[str, Any]]:
    """Per split: its per-class table and confusion matrix, from details (or scores, for logs
    written without record_run's separation)."""
    names = [s for s in run.scores if isinstance(run.scores[s], dict)]
    out = []
    for split in dict.fromkeys([*SPLITS, *names]):
        found: dict[str, Any] = {}
        for source in (run.scores.get(split), run.details.get(split)):
            found |= {k: v for k, v in _dict(source).items() if v is not None}
        if split == "validation":  # blobs at the top level of details
            for k in ("confusion_matrix", "per_class", "class_names"):
                found.setdefault(k, run.details.get(k))
        matrix = _confusion(found.get("confusion_matrix"), found.get("class_names"))
        per_class = _per_class(found.get("per_class"))
        if matrix or per_class:
            out.append({"name": str(split), "confusion": matrix, "per_class": per_class})
    return out


def _scores(run: Run) -> dict[str, Any] | None:
    splits = [s for s in run.scores if isinstance(run.scores[s], dict)]
    names = sorted(
        {str(k) for s in splits for k, v in run.scores[s].items() if not isinstance(v, dict | list)}
    )
    if not names:
        return None
    rows = [[n, *(number(run.scores[s].get(n)) for s in splits)] for n in names]
    return {"header": ["metric", *map(str, splits)], "rows": rows}


def _preview(run: Run) -> dict[str, Any] | None:
    """The augmentation preview as a data URI, only for a PNG inside the folder that holds the
    run's log (the store's folder): a log cannot make the page embed any other file."""
    name = run.details.get("augment_preview")
    if not name:
        return None
    uri = None
    try:
        folder = run.log.parent.resolve()
        path = (folder / str(name)).resolve()
        if path.is_relative_to(folder) and path.stat().st_size <= MAX_PREVIEW_BYTES:
            data = path.read_bytes()
            if data.startswith(b"\x89PNG\r\n\x1a\n"):
                uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    except (OSError, ValueError):
        pass
    return {"uri": uri, "name": text(name)}


def _probe_view(group: ProbeGroup) -> dict[str, Any]:
    """A probe call: its curve, a row per layer, and the other layers' full views."""
    points = curve(group)
    return {
        "chart": probe_chart(points),
        "rows": [
            [
                str(p["position"]),
                p["layer"],
                p["chosen"] or "-",
                *map(number, (p["validation"], p["test"])),
            ]
            for p in points
        ],
        "others": [_run_view(r, 0) for r in group.others],
    }


def _ladder_view(found: dict[str, Any] | None) -> dict[str, Any] | None:
    if found is None:
        return None
    rows = [
        {"step": row["step"], "key": row["run"].key, "id": row["run"].id,
         "layer": row["run"].layer, "classifier": row["run"].classifier,
         "params": params_view(row["run"].params)["summary"], "val": row["val"],
         "test": row["test"], "gain": row["gain"]}
        for row in found["rows"]
    ]  # fmt: skip
    return {"split": found["split"], "rows": rows, "missing": found["missing"]}


def _run_view(run: Run, rank: int, group: ProbeGroup | None = None) -> dict[str, Any]:
    lr, suggestion = lr_chart(run.details.get("lr_find"))
    return {
        "key": run.key,
        "id": run.id,
        "rank": rank,
        "kind": run.kind,
        "layer": run.layer,
        "classifier": run.classifier,
        "params": params_view(run.params),
        "val": run.metric("validation", "accuracy"),
        "test": run.metric("test", "accuracy"),
        "f1": run.macro_f1,
        "time": short_time(run.time),
        "info": [
            ("time", run.time),
            ("store", str(run.store)),
            ("host / pid", f"{run.host} / {run.pid}"),
            ("featx", run.featx_version),
            ("model", run.model_path or "-"),
            ("command", run.command or "-"),
        ],
        "settings": [(str(k), text(v)) for k, v in run.settings.items()],
        "scores": _scores(run),
        "splits": _splits(run),
        "history": history_chart(run.details.get("history")),
        "lr": lr,
        "suggestion": suggestion,
        "preview": _preview(run),
        "probe": _probe_view(group) if group is not None else None,
    }


def _provenance(store: Path, meta: dict[str, Any] | None) -> dict[str, Any] | None:
    if not meta:
        return None
    dataset = _dict(meta.get("dataset"))
    rows = [
        ("path", store),
        ("backbone", meta.get("backbone")),
        ("weights", meta.get("weights")),
        ("weights sha256", meta.get("weights_sha256")),
        ("preprocessing", meta.get("preprocessing_text") or meta.get("preprocessing")),
        ("dataset", dataset.get("root")),
        ("dataset fingerprint", dataset.get("fingerprint")),
        ("dataset files", dataset.get("n_files")),
        ("augmentation", meta.get("augment")),
        ("created", meta.get("created")),
    ]
    history = meta.get("history") if isinstance(meta.get("history"), list) else []
    return {
        "rows": [(k, text(v)) for k, v in rows],
        "versions": sorted((str(k), text(v)) for k, v in _dict(meta.get("versions")).items()),
        "history": [
            (text(h.get("time")), text(h.get("command")), text(h.get("layers")))
            for h in map(_dict, history)
        ],
    }


def _meta(runs: Sequence[Run]) -> dict[str, Any] | None:
    """The store's provenance as its latest run logged it."""
    return next((r.meta for r in sorted(runs, key=lambda r: r.time, reverse=True) if r.meta),
                None)  # fmt: skip


def _store_views(by_store: dict[Path, list[Run]], ladders, best: int) -> list[dict[str, Any]]:
    """One view per store, in the order of `by_store` (the store with the best run first)."""
    views = []
    for i, (store, mine) in enumerate(by_store.items()):
        meta = _meta(mine)
        shown = [_run_view(run, rank, group)
                 for rank, (run, group) in enumerate(collapse(mine), 1)]  # fmt: skip
        views.append(
            {
                "anchor": f"store-{i + 1}",
                "name": store.name,
                "path": str(store),
                "runs": shown,
                "best": shown[:best],
                "rest": shown[best:],
                "top": shown[0]["val"] if shown[0]["val"] is not None else shown[0]["test"],
                "provenance": _provenance(store, meta),
                "ladder": _ladder_view(ladders[store]),
            }
        )
    return views


def _across_views(by_store: dict[Path, list[Run]], ladders, anchors) -> list[dict[str, Any]]:
    """The ladder across the stores of each experiment on several splits."""
    found = across_splits([
        (store, _meta(runs), ladders[store]) for store, runs in by_store.items() if ladders[store]
    ])  # fmt: skip
    for comparison in found:
        for row in comparison["stores"]:
            store = row.pop("store")
            row["anchor"], row["name"] = anchors[store], store.name
    return found


def write_report(
    out: str | os.PathLike[str], runs: Sequence[Run], *, best: int = DEFAULT_BEST
) -> Path:
    """Write one self-contained HTML page about `runs` to `out` and return its path: a section
    per store with its leaderboard, its ladder, full sections for its `best` best runs and
    collapsed ones for the rest, and the store's provenance; first, the ladder across the
    stores of each experiment on several splits."""
    by_store: dict[Path, list[Run]] = {}
    for run in ranked(runs):
        by_store.setdefault(run.store, []).append(run)
    ladders = {store: ladder(mine) for store, mine in by_store.items()}
    stores = _store_views(by_store, ladders, max(best, 0))
    anchors = {Path(view["path"]): view["anchor"] for view in stores}
    script = _ENV.get_template("sort.js.j2").render()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    page = _ENV.get_template("report.html.j2").render(
        stores=stores,
        across=_across_views(by_store, ladders, anchors),
        n_runs=sum(map(len, by_store.values())),
        version=__version__,
        script=Markup(script),
        script_hash=f"sha256-{digest}",
        number=number,
    )
    return atomic_write(out, page.encode("utf-8"))
