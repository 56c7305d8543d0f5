"""The report's charts: the figures `featx finetune` draws (`featx.finetuning.plots`) and a
probe's accuracy against depth, rendered as inline SVG with real text. Logged values are
checked first, so a crafted log cannot break a figure; only numbers, featx's own labels and
logged layer names and settings (one plain line each, never read as mathematics) reach the SVG.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from markupsafe import Markup

from featx.errors import UsageError

__all__ = ["Chart", "history_chart", "lr_chart", "probe_chart"]

MAX_POINTS = 10_000
METRICS = ("train_accuracy", "val_accuracy", "train_loss", "val_loss")


class Chart(SimpleNamespace):
    """`svg` (markup to embed) or `note` (why there is no chart)."""

    svg: Markup | None
    note: str | None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _render(draw: Callable[[Path], Path]) -> Chart:
    """Run `draw(path)` with a temporary .svg path and return the SVG element it wrote."""
    try:
        import matplotlib
    except ImportError:
        return Chart(svg=None, note="Charts need matplotlib: pip install featx[plot].")
    with tempfile.TemporaryDirectory(prefix="featx-chart-") as tmp:
        with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 10}):
            try:
                text = draw(Path(tmp) / "chart.svg").read_text(encoding="utf-8")
            except UsageError as e:
                return Chart(svg=None, note=str(e))
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return Chart(svg=Markup(text), note=None)


def history_chart(history: Any) -> Chart | None:
    """Accuracy and loss per epoch, training against validation, with the unfreezing marked;
    None when `history` holds no epoch with a number."""
    from featx.finetuning.plots import plot_history

    if not isinstance(history, list):
        return None
    clean = []
    for h in history[:MAX_POINTS]:
        if not isinstance(h, dict) or _number(h.get("epoch")) is None:
            continue
        clean.append(
            {
                "epoch": _number(h["epoch"]),
                "stage": h.get("stage") if isinstance(h.get("stage"), str) else "",
                "stage_epoch": _number(h.get("stage_epoch")),
                **{k: _number(h.get(k)) for k in METRICS},
            }
        )
    if not any(h[k] is not None for h in clean for k in METRICS):
        return None
    return _render(lambda path: plot_history(clean, path))


def lr_chart(curve: Any) -> tuple[Chart | None, float | None]:
    """The learning-rate range test's smoothed loss against the rate, with the candidates
    marked, and the suggested rate; (None, None) without a usable curve."""
    from featx.finetuning.plots import plot_lr_curve

    if not isinstance(curve, dict) or not isinstance(curve.get("lrs"), list):
        return None, None
    losses = curve.get("smoothed") if isinstance(curve.get("smoothed"), list) else None
    losses = losses or (curve.get("losses") if isinstance(curve.get("losses"), list) else [])
    pairs = [
        (_number(x), _number(y))
        for x, y in zip(curve["lrs"][:MAX_POINTS], losses[:MAX_POINTS], strict=False)
    ]
    pairs = [(x, y) for x, y in pairs if x is not None and x > 0 and y is not None]
    if not pairs:
        return None, None

    def rate(name: str) -> float | None:
        value = _number(curve.get(name))
        return value if value is not None and value > 0 else None

    result = SimpleNamespace(
        lrs=[x for x, _ in pairs],
        smoothed=[y for _, y in pairs],
        steepest=rate("steepest") or rate("suggestion"),
        tenth_of_minimum=rate("tenth_of_minimum"),
        minimum=rate("minimum"),
        suggestion=rate("suggestion"),
    )
    return _render(lambda path: plot_lr_curve(result, path)), result.suggestion


def _label(value: Any, limit: int = 40) -> str:
    """Logged text as one short printable line."""
    value = "".join(c if c.isprintable() else "?" for c in str(value))
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _plot_probe(points: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.5, 0.9 * len(points)), 4.2), dpi=100)
    ax = fig.add_subplot()
    xs = [p["position"] for p in points]
    for split, style in (("validation", "s-"), ("test", "o-")):
        pairs = [(x, p[split]) for x, p in zip(xs, points, strict=True) if p[split] is not None]
        if pairs:
            (line,) = ax.plot(*zip(*pairs, strict=True), style, label=split)
            line.set_gid(f"probe-{split}")
    for x, p in zip(xs, points, strict=True):
        y = p["validation"] if p["validation"] is not None else p["test"]
        if p["chosen"] and y is not None:
            ax.annotate(p["chosen"], (x, y), xytext=(0, 7), textcoords="offset points",
                        ha="center", fontsize=8, color="dimgrey", parse_math=False)  # fmt: skip
    ax.set_xticks(xs, [p["layer"] for p in points], rotation=30, ha="right", parse_math=False)
    ax.set_xmargin(0.1)
    ax.set_ymargin(0.2)
    ax.set_xlabel("layer, in network order")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, bbox_inches="tight")  # every label and annotation inside the figure
    return path


def probe_chart(points: list[dict[str, Any]]) -> Chart | None:
    """Validation and test accuracy of each probed layer against its depth, the chosen C or k
    written at each layer's point (`featx.report.probes.curve`); None without a score."""
    clean = [
        {**p, "validation": _number(p["validation"]), "test": _number(p["test"]),
         "layer": _label(p["layer"]), "chosen": _label(p["chosen"])}
        for p in points[:MAX_POINTS]
    ]  # fmt: skip
    if not any(p["validation"] is not None or p["test"] is not None for p in clean):
        return None
    return _render(lambda path: _plot_probe(clean, path))
