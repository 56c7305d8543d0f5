"""What a probe reports about one set of logits: accuracy, mean per-class accuracy, top-5,
expected calibration error before and after temperature scaling, and the confusion matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["ECE_BINS", "expected_calibration_error", "fit_temperature", "score_logits"]

ECE_BINS = 15


def expected_calibration_error(
    logits: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """ECE with `bins` equal-width confidence bins: the share-weighted mean of
    |accuracy - confidence| over the bins (Guo et al. 2017)."""
    proba = torch.softmax(logits.to(torch.float64), dim=1)
    confidence, predicted = proba.max(dim=1)
    correct = (predicted == y).to(torch.float64)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=logits.device)
    which = torch.bucketize(confidence, edges[1:-1], right=True)
    ece = torch.zeros((), dtype=torch.float64, device=logits.device)
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.sum() * (correct[inside].mean() - confidence[inside].mean()).abs()
    return float(ece / len(y))


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of softmax(logits / T)
    (fitted on validation rows), searched on log T in [log 1e-3, log 1e3] (Brent's method;
    the likelihood is convex in 1 / T)."""
    from scipy.optimize import minimize_scalar

    logits = logits.detach().to(torch.float64)
    finite = torch.isfinite(logits).all(dim=1)
    logits, y = logits[finite], y[finite]
    if not len(y):
        return 1.0

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits * np.exp(-log_t), y))

    found = minimize_scalar(nll, bounds=(np.log(1e-3), np.log(1e3)), method="bounded",
                            options={"xatol": 1e-6})  # fmt: skip
    return float(np.exp(found.x))


def score_logits(
    logits: torch.Tensor, y: torch.Tensor, n_classes: int, temperature: float | None = None
) -> dict[str, Any]:
    """accuracy, balanced_accuracy (mean per-class accuracy over the classes present), top5
    (more than 5 classes, else None), log_loss, ece, and with `temperature` ece_scaled and
    log_loss_scaled; per_class_accuracy and confusion_matrix (rows: true class)."""
    logits, y = logits.detach(), y.to(logits.device)
    predicted = logits.argmax(dim=1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y.cpu().numpy(), predicted.cpu().numpy()), 1)
    support = confusion.sum(axis=1)
    per_class = np.divide(
        np.diag(confusion), support, out=np.full(n_classes, np.nan), where=support > 0
    )
    top5 = None
    if n_classes > 5:
        best = logits.topk(5, dim=1).indices
        top5 = float((best == y[:, None]).any(dim=1).to(torch.float64).mean())
    out: dict[str, Any] = {
        "n_samples": len(y),
        "accuracy": float((predicted == y).to(torch.float64).mean()),
        "balanced_accuracy": float(np.nanmean(per_class)),
        "top5": top5,
        "log_loss": _log_loss(logits, y),
        "ece": expected_calibration_error(logits, y),
    }
    if temperature is not None:
        out["temperature"] = temperature
        out["ece_scaled"] = expected_calibration_error(logits / temperature, y)
        out["log_loss_scaled"] = _log_loss(logits / temperature, y)
    out["per_class_accuracy"] = [None if v != v else float(v) for v in per_class]
    out["confusion_matrix"] = confusion.tolist()
    return out


def _log_loss(logits: torch.Tensor, y: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.to(torch.float64), dim=1)
    picked = logp.gather(1, y[:, None])[:, 0].clamp_min(np.log(1e-15))
    return float(-picked.mean())
