"""The report's charts: the figures `featx finetune` draws (`featx.finetuning.plots`), rendered
as inline SVG with real text. Logged values are checked first, so a crafted log cannot break
a figure; only numbers and featx's own labels reach the SVG."""

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

__all__ = ["Chart", "history_chart", "lr_chart"]

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
