"""Multinomial L2 logistic regression along a path of C values, in torch (CPU or GPU).

The objective is scikit-learn's `LogisticRegression(penalty="l2", solver="lbfgs")`:

    F(W, b) = (1 / S) * (sum_i s_i * CE(x_i W + b, y_i) + ||W||^2 / (2 C)),   S = sum_i s_i

with `s_i` the sample weights (1, or `n / (K * n_class)` for balanced class weights) and the
intercept `b` not penalised. Features are standardised with the statistics (mean, standard
deviation; 1 for constant features) of the rows being fitted, folded into the weights rather
than copied: `logits = x (W / sd) + b - (mean / sd) W`, so the stored rows are never duplicated.

The solver is L-BFGS (`torch.optim.LBFGS`, strong-Wolfe line search) with the gradient computed
by hand. It stops by scikit-learn's rule for lbfgs, at a tenth of its tolerance (`TOL`), and
reaches a loss at or below scikit-learn's at the same C. A path solves C values from the
smallest to the largest, each warm-started at the previous solution. Rows arrive as blocks
(`Blocks`): one block in memory, or row chunks read from the store on every evaluation of the
objective (out-of-core), so memory holds one chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "TOL",
    "Blocks",
    "LinearModel",
    "PathStep",
    "balanced_weights",
    "objective",
    "solve",
    "solve_path",
    "standardiser",
]

TOL = 1e-5
"""Stop at a C when the largest entry of the gradient of F (scaled by 1 / S, as scikit-learn
scales it) is below this: scikit-learn's stopping rule for lbfgs at a tenth of its default
`tol`. Warm-started at a large C, the path starts where the gradient is already small, so
scikit-learn's own 1e-4 would stop it at a loss above the one scikit-learn reaches from zero."""

Blocks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]
"""A zero-argument callable yielding (raw features, labels 0..K-1, sample weights or None)."""


@dataclass
class LinearModel:
    """Weights on standardised features: `logits(x) = ((x - mean) / scale) W + b`."""

    W: torch.Tensor  # (d, K)
    b: torch.Tensor  # (K,)
    mean: torch.Tensor  # (d,)
    scale: torch.Tensor  # (d,)

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, intercept) acting on unstandardised rows."""
        W = self.W / self.scale[:, None]
        return W, self.b - self.mean @ W

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        W, b = self.raw()
        return X.to(W.dtype) @ W + b


def standardiser(blocks: Blocks, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the features of every row of `blocks` (unweighted, in
    float64, shifted by the first block's mean for accuracy), as StandardScaler has them."""
    n, shift, total, squares = 0, None, None, None
    for X, _, _ in blocks():
        X = X.to(torch.float64)
        if shift is None:
            shift = X.mean(0)
            total, squares = torch.zeros_like(shift), torch.zeros_like(shift)
        centred = X - shift
        total += centred.sum(0)
        squares += (centred * centred).sum(0)
        n += len(X)
    mean = total / n
    var = (squares / n - mean * mean).clamp_min(0)
    scale = var.sqrt()
    scale[scale < 10 * torch.finfo(torch.float64).eps * (shift + mean).abs().clamp_min(1)] = 1.0
    return (shift + mean).to(dtype), scale.to(dtype)


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's `class_weight="balanced"`: n / (K * n_class) for each class present."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(y) / (present.sum() * counts[present])
    return weights


def objective(
    blocks: Blocks,
    model: LinearModel,
    C: float,
    total_weight: float,
    grad: bool = True,
) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
    """F(W, b) and, with `grad`, its gradients with respect to W and b."""
    W_raw, b_raw = model.raw()
    loss = torch.zeros((), dtype=W_raw.dtype, device=W_raw.device)
    gW = torch.zeros_like(W_raw) if grad else None
    gb = torch.zeros_like(b_raw) if grad else None
    for X, y, w in blocks():
        X = X.to(W_raw.dtype)
        logp = torch.log_softmax(torch.addmm(b_raw, X, W_raw), dim=1)
        picked = logp.gather(1, y[:, None])[:, 0]
        loss -= picked.sum() if w is None else (w * picked).sum()
        if grad:
            G = logp.exp_()
            G.scatter_add_(1, y[:, None], G.new_full((len(y), 1), -1.0))
            if w is not None:
                G *= w[:, None]
            gW += X.T @ G
            gb += G.sum(0)
    W = model.W
    loss = (loss + (W * W).sum() / (2 * C)) / total_weight
    if not grad:
        return float(loss), None, None
    # back from raw weights to the standardised ones: W_raw = W / scale, b_raw = b - mean W_raw
    gW = (gW - model.mean[:, None] * gb[None, :]) / model.scale[:, None]
    gW = (gW + W / C) / total_weight
    return float(loss), gW, gb / total_weight


@dataclass
class PathStep:
    """One solved C: its model and the optimiser's effort."""

    C: float
    model: LinearModel
    loss: float
    iterations: int
    evaluations: int
    seconds: float


@dataclass
class _Counter:
    evaluations: int = 0
    losses: list[float] = field(default_factory=list)


def solve(
    blocks: Blocks,
    model: LinearModel,
    C: float,
    total_weight: float,
    *,
    max_iter: int = 1000,
    tol: float = TOL,
) -> PathStep:
    """Minimise F at C with L-BFGS, starting from (and updating in place) `model`'s W and b.
    Stops when the largest gradient entry is below `tol` or after `max_iter` iterations."""
    start = time.perf_counter()
    W = model.W.requires_grad_(False)
    b = model.b.requires_grad_(False)
    optimiser = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=tol,
        tolerance_change=1e-14 if W.dtype == torch.float64 else 1e-9,
        history_size=10,
        line_search_fn="strong_wolfe",
    )
    counter = _Counter()

    def closure() -> torch.Tensor:
        loss, gW, gb = objective(blocks, model, C, total_weight)
        W.grad, b.grad = gW, gb
        counter.evaluations += 1
        counter.losses.append(loss)
        return torch.tensor(loss, dtype=W.dtype)

    optimiser.step(closure)
    iterations = optimiser.state[optimiser._params[0]].get("n_iter", 0)
    W.grad = b.grad = None
    loss, _, _ = objective(blocks, model, C, total_weight, grad=False)
    return PathStep(C, model, loss, iterations, counter.evaluations, time.perf_counter() - start)


def solve_path(
    blocks: Blocks,
    Cs: Iterable[float],
    n_classes: int,
    mean: torch.Tensor,
    scale: torch.Tensor,
    total_weight: float,
    *,
    max_iter: int = 1000,
    tol: float = TOL,
    init: LinearModel | None = None,
) -> Iterator[PathStep]:
    """Solve each C in increasing order, warm-starting at the previous solution (or `init`);
    yields each step with a copy of its model."""
    dtype, device = mean.dtype, mean.device
    if init is None:
        W = torch.zeros((len(mean), n_classes), dtype=dtype, device=device)
        b = torch.zeros(n_classes, dtype=dtype, device=device)
    else:
        W, b = init.W.clone(), init.b.clone()
    model = LinearModel(W, b, mean, scale)
    for C in sorted(float(c) for c in Cs):
        step = solve(blocks, model, C, total_weight, max_iter=max_iter, tol=tol)
        step.model = LinearModel(model.W.clone(), model.b.clone(), mean, scale)
        yield step
