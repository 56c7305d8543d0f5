"""Classification metrics as plain data, their text table, and the confusion-matrix plot."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
)

__all__ = ["classification_metrics", "format_number", "metrics_table", "plot_confusion_matrix"]

# name in the metrics dict -> label in tables
SUMMARY = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "log_loss": "log loss",
}
MAX_PRINTED_CLASSES = 20  # wider confusion matrices go to the PNG only


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: list[str],
    proba: np.ndarray | None = None,
    proba_labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, log loss (None without probabilities),
    per-class precision/recall/F1/support and the confusion matrix.

    Labels are indices into `class_names`; `proba` has one column per entry of `proba_labels`
    (the classifier's `classes_`, which may lack classes absent from its training data).
    """
    labels = np.arange(len(class_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "y_pred contains classes not in y_true"
        out: dict[str, Any] = {
            "n_samples": len(y_true),
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "log_loss": None,
        }
        if proba is not None:
            full = np.zeros((len(y_true), len(class_names)))
            full[:, np.asarray(proba_labels, dtype=int)] = proba
            out["log_loss"] = float(log_loss(y_true, full, labels=labels))
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0
        )
    out["per_class"] = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    out["class_names"] = list(class_names)
    return out


def format_number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def metrics_table(metrics: dict[str, Any], title: str) -> str:
    """The summary numbers, the per-class table and (up to 20 classes) the confusion matrix."""
    lines = [f"{title} ({metrics['n_samples']} images)"]
    for key, label in SUMMARY.items():
        value = metrics[key]
        note = (
            "  (the classifier gives no probabilities)"
            if key == "log_loss" and value is None
            else ""
        )
        lines.append(f"  {label:<18} {format_number(value)}{note}")
    names = metrics["class_names"]
    width = max(12, *(len(n) for n in names)) if names else 12
    lines.append("")
    lines.append(f"  {'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
    for name, row in metrics["per_class"].items():
        lines.append(
            f"  {name:<{width}} {row['precision']:>9.3f} {row['recall']:>7.3f} "
            f"{row['f1']:>7.3f} {row['support']:>8d}"
        )
    if len(names) <= MAX_PRINTED_CLASSES:
        matrix = metrics["confusion_matrix"]
        cell = max(5, *(len(n) for n in names), *(len(str(v)) for r in matrix for v in r)) + 1
        lines.append("")
        lines.append("  confusion matrix (rows: true class, columns: predicted class)")
        lines.append(f"  {'':<{width}}" + "".join(f"{n:>{cell}}" for n in names))
        for name, row in zip(names, matrix, strict=True):
            lines.append(f"  {name:<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def plot_confusion_matrix(
    metrics: dict[str, Any], path: str | os.PathLike, title: str = ""
) -> Path:
    """Write the confusion matrix (counts, rows normalised for colour) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = metrics["class_names"]
    matrix = np.asarray(metrics["confusion_matrix"])
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    n = len(names)
    side = min(24.0, 2.5 + 0.45 * n)
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), names, rotation=90 if n > 6 else 0, fontsize=8 if n > 20 else 10)
    ax.set_yticks(range(n), names, fontsize=8 if n > 20 else 10)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion matrix")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
