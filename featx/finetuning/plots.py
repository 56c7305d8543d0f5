"""PNG plots of training: the per-epoch history and the learning-rate range test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from featx.errors import UsageError

__all__ = ["plot_history", "plot_lr_curve"]


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(
            "plots need matplotlib; install it with `pip install featx[plot]`."
        ) from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_history(history: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Two panels, accuracy and loss per epoch, training against validation; a dashed line
    marks where the full stage begins."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11, 4.2)
    epochs = [h["epoch"] for h in history]
    starts = [h["epoch"] for h in history if h["stage"] == "full" and h["stage_epoch"] == 1]
    for i, (metric, label) in enumerate((("accuracy", "accuracy"), ("loss", "loss"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="training")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], "s-", label="validation")
        for x in starts:
            if x > 1:
                ax.axvline(x - 0.5, color="grey", linestyle="--", linewidth=1)
                ax.annotate("unfrozen", (x - 0.5, 1), xycoords=("data", "axes fraction"),
                            xytext=(3, -12), textcoords="offset points", color="grey")  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{title}: {label}" if title else label)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_lr_curve(result: Any, path: str | os.PathLike, title: str = "") -> Path:
    """Smoothed loss against learning rate (log scale) of a range test (`RangeTest`), with both
    candidate rates marked (steepest descent; a tenth of the minimum) and the suggestion named."""
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.smoothed, color="black", linewidth=1.2)
    ax.set_xscale("log")
    marks = (
        (result.steepest, "tab:red", "steepest descent"),
        (result.tenth_of_minimum, "tab:blue", "minimum / 10"),
    )
    for rate, colour, label in marks:
        if rate is None:
            continue
        chosen = " (suggested)" if rate == result.suggestion else ""
        ax.axvline(rate, color=colour, linestyle="--", label=f"{label} {rate:.2e}{chosen}")
    if result.minimum is not None:
        ax.axvline(
            result.minimum, color="grey", linestyle=":", label=f"minimum {result.minimum:.2e}"
        )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title(title or "learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
