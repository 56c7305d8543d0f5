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

Preconditioning. At weak regularisation the Hessian of F in W, (X^T D X + I / C) / S, has the
spread of the standardised features' squared singular values, and L-BFGS crawls. With
G = X^T diag(s) X = V diag(s2) V^T (one pass over the rows, `eigenbasis`), the solver
optimises P in W = V diag(1 / p) P with p = sqrt((s2 + 1 / C) / S): in P both the data part
(the weighted covariance) and the penalty part of the Hessian are about 1 in every direction.
This is an exact change of variables: F, the penalty on W, the unpenalised intercept and the
stopping rule (checked on the gradient with respect to W and b) are unchanged, so the solutions
are those without it. The basis costs d^2 per row once and an O(d^3) eigendecomposition, and
each evaluation then pays two d x d x K products on top of the objective's rows x d x K: it is
used for at most `PRECONDITION_MAX_FEATURES` features and at least `PRECONDITION_ROWS_PER_FEATURE`
rows per feature, and skipped otherwise (where the rows are few, the penalty already dominates
the Hessian's spread).
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
    "PRECONDITION_MAX_FEATURES",
    "PRECONDITION_ROWS_PER_FEATURE",
    "LinearModel",
    "PathStep",
    "balanced_weights",
    "eigenbasis",
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

PRECONDITION_MAX_FEATURES = 4096
"""Above this many features `eigenbasis` returns None and the solver runs on W directly: the
d x d eigendecomposition (O(d^3)) and the d^2-per-row pass would cost more than they save."""

PRECONDITION_ROWS_PER_FEATURE = 4
"""Below this many rows per feature `eigenbasis` returns None: the change of variables' two
d x d x K products per evaluation would cost about as much as the evaluation itself, and with
few rows per feature the penalty already evens out the curvature (docs/probe.md)."""

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


def eigenbasis(
    blocks: Blocks, mean: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(V, s2) with X^T diag(s) X = V diag(s2) V^T over the standardised rows of `blocks` (one
    pass, in float64; V in `mean`'s dtype), or None above `PRECONDITION_MAX_FEATURES` features or
    below `PRECONDITION_ROWS_PER_FEATURE` rows per feature."""
    if len(mean) > PRECONDITION_MAX_FEATURES:
        return None
    mean64, scale64 = mean.to(torch.float64), scale.to(torch.float64)
    G = torch.zeros((len(mean), len(mean)), dtype=torch.float64, device=mean.device)
    rows = 0
    for X, _, w in blocks():
        Xs = (X.to(torch.float64) - mean64) / scale64
        G += Xs.T @ (Xs if w is None else Xs * w.to(torch.float64)[:, None])
        rows += len(X)
    if rows < PRECONDITION_ROWS_PER_FEATURE * len(mean):
        return None
    s2, V = torch.linalg.eigh(G)
    return V.to(mean.dtype), s2.clamp_min(0)


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


class _Converged(Exception):
    """Raised by the objective's closure at a point that meets the stopping rule."""


def solve(
    blocks: Blocks,
    model: LinearModel,
    C: float,
    total_weight: float,
    *,
    max_iter: int = 1000,
    tol: float = TOL,
    basis: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PathStep:
    """Minimise F at C with L-BFGS, starting from (and updating) `model`'s W and b; in the
    variables P of `basis` (see `eigenbasis`) if given. Stops at the first evaluated point whose
    largest gradient entry (with respect to W and b) is below `tol`, or after `max_iter`
    iterations."""
    start = time.perf_counter()
    if basis is None:
        P = model.W.detach().clone()
        to_W = to_P = lambda A: A  # noqa: E731
    else:
        V, s2 = basis
        p = ((s2 + 1.0 / C) / total_weight).sqrt().to(model.W.dtype)[:, None]
        P = p * (V.T @ model.W)
        to_W = lambda A: V @ (A / p)  # noqa: E731
        to_P = lambda A: (V.T @ A) / p  # noqa: E731  (the chain rule of W = V diag(1/p) P)
    b = model.b.requires_grad_(False)
    optimiser = torch.optim.LBFGS(
        [P, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=0.0,  # the rule is on W's gradient, checked in the closure
        tolerance_change=1e-14 if P.dtype == torch.float64 else 1e-9,
        history_size=10,
        line_search_fn="strong_wolfe",
    )
    counter = _Counter()

    def closure() -> torch.Tensor:
        model.W = to_W(P)
        loss, gW, gb = objective(blocks, model, C, total_weight)
        counter.evaluations += 1
        counter.losses.append(loss)
        if max(float(gW.abs().max()), float(gb.abs().max())) <= tol:
            raise _Converged
        P.grad, b.grad = to_P(gW), gb
        return torch.tensor(loss, dtype=P.dtype)

    try:
        optimiser.step(closure)
    except _Converged:
        pass  # P and b are at the point that met the rule
    iterations = optimiser.state[optimiser._params[0]].get("n_iter", 0)
    P.grad = b.grad = None
    model.W = to_W(P)
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
    precondition: bool = True,
) -> Iterator[PathStep]:
    """Solve each C in increasing order, warm-starting at the previous solution (or `init`);
    yields each step with a copy of its model. With `precondition`, in the variables of
    `eigenbasis` (computed once for the path; skipped above `PRECONDITION_MAX_FEATURES`)."""
    dtype, device = mean.dtype, mean.device
    if init is None:
        W = torch.zeros((len(mean), n_classes), dtype=dtype, device=device)
        b = torch.zeros(n_classes, dtype=dtype, device=device)
    else:
        W, b = init.W.clone(), init.b.clone()
    model = LinearModel(W, b, mean, scale)
    basis = eigenbasis(blocks, mean, scale) if precondition else None
    for C in sorted(float(c) for c in Cs):
        step = solve(blocks, model, C, total_weight, max_iter=max_iter, tol=tol, basis=basis)
        step.model = LinearModel(model.W.clone(), model.b.clone(), mean, scale)
        yield step
