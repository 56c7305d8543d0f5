"""The three probe protocols on one layer, each as the field runs it:

- linear: multinomial L2 logistic regression over C in `logspace(-6, 5, 45)` (Kornblith et
  al. 2019), one warm-started L-BFGS path on the training rows; C chosen on the validation
  rows, then refit on training + validation rows at that C and scored on the test rows.
- knn: cosine k nearest neighbours with exp(cos / 0.07) weighted votes (DINO), k in
  {10, 20, 100, 200} chosen on validation; the test rows search training + validation rows.
- ncm: the nearest class mean by cosine; the test rows use the means of training + validation.

The selection metric is accuracy, or mean per-class accuracy when the classes are unbalanced.
A temperature is fitted on the validation logits of the chosen setting (by NLL), and the
expected calibration error is reported before and after it. A few-shot run (`subset`) fits on
those training rows only, and scores the test rows without a refit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from featx.classify.probe_data import LayerSource
from featx.classify.probe_knn import KNN_KS, knn_logits, ncm_logits
from featx.classify.probe_scores import fit_temperature, score_logits
from featx.classify.probe_solver import (
    TOL,
    Design,
    LinearModel,
    balanced_weights,
    solve_batch,
    solve_path,
    standardiser,
)

__all__ = ["C_GRID", "PROTOCOLS", "run_protocol"]

C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))
PROTOCOLS = ("linear", "knn", "ncm")


def _quick(logits: torch.Tensor, y: torch.Tensor, n_classes: int) -> dict[str, float]:
    """accuracy and mean per-class accuracy."""
    right = (logits.argmax(dim=1) == y).to(torch.float64)
    counts = torch.bincount(y, minlength=n_classes).to(torch.float64)
    hits = torch.bincount(y, weights=right, minlength=n_classes)
    present = counts > 0
    return {
        "accuracy": float(right.mean()),
        "balanced_accuracy": float((hits[present] / counts[present]).mean()),
    }


def run_protocol(
    source: LayerSource,
    protocol: str,
    *,
    n_classes: int,
    metric: str,
    class_weight: str = "none",
    subset: np.ndarray | None = None,
    Cs: tuple[float, ...] = C_GRID,
    max_iter: int = 1000,
    tol: float = TOL,
) -> dict[str, Any]:
    """One protocol on one layer: {"chosen", "path", "validation", "test" (None without a test
    split), "refit", "temperature", "seconds"}; `subset`: positions of the training rows a
    few-shot run fits on."""
    start = time.perf_counter()
    if protocol == "linear":
        out = _linear(source, n_classes, metric, class_weight, subset, Cs, max_iter, tol)
    else:
        out = _neighbours(source, protocol, n_classes, metric, subset)
    out["seconds"] = time.perf_counter() - start
    return out


def _finish(
    source: LayerSource,
    val_logits: torch.Tensor,
    test_logits: torch.Tensor | None,
    n_classes: int,
) -> dict[str, Any]:
    y_val = source.labels("validation")
    temperature = fit_temperature(val_logits, y_val)
    test = None
    if test_logits is not None:
        test = score_logits(test_logits, source.labels("test"), n_classes, temperature)
    return {
        "temperature": temperature,
        "validation": score_logits(val_logits, y_val, n_classes, temperature),
        "test": test,
    }


# ---- linear ----------------------------------------------------------------------------------
def _weighted(source: LayerSource, names: tuple[str, ...], subset, weights: torch.Tensor | None):
    def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        for X, y in source.chunks(names, subset):
            yield X, y, None if weights is None else weights[y]

    return blocks


def _fit_design(source: LayerSource, names, subset, class_weight: str, n_classes: int) -> Design:
    """The rows a model is fitted on, a standardised copy held when the budget allows."""
    y = torch.cat([y for _, y in _label_chunks(source, names, subset)]).cpu().numpy()
    weights = None
    total = float(len(y))
    if class_weight == "balanced":
        per_class = balanced_weights(y, n_classes)
        weights = torch.as_tensor(per_class, dtype=source.dtype, device=source.device)
        total = float(per_class[y].sum())
    blocks = _weighted(source, names, subset, weights)
    mean, scale = standardiser(blocks, source.dtype)
    return Design.build(blocks, mean, scale, total, hold=source.can_copy(len(y)))


def _label_chunks(source: LayerSource, names, subset):
    if subset is not None:
        yield None, source.parts[names[0]].labels[torch.as_tensor(subset)]
        return
    for name in names:
        yield None, source.parts[name].labels


def _linear(source, n_classes, metric, class_weight, subset, Cs, max_iter, tol):
    design = _fit_design(source, ("train",), subset, class_weight, n_classes)
    X_val, y_val = source.features("validation"), source.labels("validation")
    path, best, best_logits, best_score = [], None, None, -np.inf
    for step in solve_path(design, Cs, n_classes, max_iter=max_iter, tol=tol):
        logits = step.model.logits(X_val)
        scores = _quick(logits, y_val, n_classes)
        path.append(
            {
                "C": step.C,
                **scores,
                "loss": step.loss,
                "iterations": step.iterations,
                "evaluations": step.evaluations,
                "seconds": round(step.seconds, 4),
            }
        )
        if scores[metric] > best_score:  # ties keep the smaller C
            best, best_logits, best_score = step, logits, scores[metric]
    model, refit = best.model, "train"
    if subset is None:
        design = _fit_design(source, ("train", "validation"), None, class_weight, n_classes)
        start = LinearModel(model.W, model.b, design.mean, design.scale)
        model = solve_batch(design, [best.C], start, max_iter=max_iter, tol=tol)[0].model
        refit = "train+validation"
    test_logits = model.logits(source.features("test")) if "test" in source.parts else None
    return {
        "chosen": {"C": best.C},
        "path": path,
        "refit": refit,
        **_finish(source, best_logits, test_logits, n_classes),
    }


# ---- knn and ncm -----------------------------------------------------------------------------
def _neighbours(source, protocol, n_classes, metric, subset):
    X_val, y_val = source.features("validation"), source.labels("validation")
    n_bank = len(source.parts["train"].rows) if subset is None else len(subset)

    def bank(names=("train",), rows=subset):
        return lambda: source.chunks(names, rows)

    with_test = "test" in source.parts
    refit = "train" if subset is not None else "train+validation"
    test_bank = bank() if subset is not None else bank(("train", "validation"), None)
    if protocol == "ncm":
        val_logits = ncm_logits(bank(), X_val, n_classes)
        test_logits = (
            ncm_logits(test_bank, source.features("test"), n_classes) if with_test else None
        )
        return {
            "chosen": {},
            "path": [],
            "refit": refit,
            **_finish(source, val_logits, test_logits, n_classes),
        }
    ks = [k for k in KNN_KS if k <= n_bank] or [n_bank]
    by_k = knn_logits(bank(), X_val, ks, n_classes)
    path = [{"k": k, **_quick(logits, y_val, n_classes)} for k, logits in by_k.items()]
    k = max(path, key=lambda p: p[metric])["k"]  # ties keep the smaller k
    test_logits = None
    if with_test:
        test_logits = knn_logits(test_bank, source.features("test"), [k], n_classes)[k]
    return {
        "chosen": {"k": k},
        "path": path,
        "refit": refit,
        **_finish(source, by_k[k], test_logits, n_classes),
    }
