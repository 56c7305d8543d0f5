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


def plot_lr_curve(
    lrs: list[float], losses: list[float], suggestion: float | None, path: str | os.PathLike,
    title: str = "learning-rate range test",
) -> Path:  # fmt: skip
    """Smoothed loss against learning rate (log scale), with the suggestion marked."""
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    if suggestion is not None:
        ax.axvline(suggestion, color="red", linestyle="--", label=f"suggestion {suggestion:.2e}")
        ax.legend()
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
