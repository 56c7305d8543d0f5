"""Multinomial L2 logistic regression along a path of C values, in torch (CPU or GPU).

The objective is scikit-learn's `LogisticRegression(penalty="l2", solver="lbfgs")`:

    F(W, b) = (1 / S) * (sum_i s_i * CE(x_i W + b, y_i) + ||W||^2 / (2 C)),   S = sum_i s_i

with `s_i` the sample weights (1, or `n / (K * n_class)` for balanced class weights) and the
intercept `b` not penalised, on features standardised with the statistics (mean, standard
deviation; 1 for constant features) of the rows being fitted.

Rows (`Design`). Held in memory, the training rows are standardised (and rotated, below) once,
a copy; streamed, each block is read raw and the standardisation is folded into the weights,
`logits = x (W / sd) + b - (mean / sd) W`, so memory holds one chunk.

Batches. Consecutive C values are solved together (`solve_batch`): one evaluation computes the
losses and gradients of every problem of the batch with one product over the rows for all of
them (`evaluate`), and a batched L-BFGS (`lbfgs.minimise`) steps each problem on its own. A
batch is as large as `batch_size` allows (memory, and the work of one evaluation); each batch
starts at the previous batch's largest-C solution. The minimum of F falls as C grows, so a step
that ends above the previous C's solution (a gradient rule can hold far from the minimum where F
is flat) is solved again from that solution. Every problem stops by scikit-learn's rule for
lbfgs at a tenth of its tolerance (`TOL`), and reaches a loss at or below scikit-learn's at
the same C. On small layers (`NEWTON_MAX_UNKNOWNS`), problems still running after
`newton_after` iterations finish with Newton's method (`probe_newton`).

Preconditioning. At weak regularisation the Hessian of F in W, (X^T D X + I / C) / S, has the
spread of the standardised features' squared singular values, and L-BFGS crawls. With
G = X^T diag(s) X = V diag(s2) V^T (one pass over the rows, `eigenbasis`), the solver
optimises P in W = V diag(1 / p) P with p = sqrt((s2 + 1 / C) / S): in P both the data part
(the weighted covariance) and the penalty part of the Hessian are about 1 in every direction.
This is an exact change of variables: F, the penalty on W, the unpenalised intercept and the
stopping rule (checked on the gradient with respect to W and b) are unchanged, so the solutions
are those without it. The basis costs d^2 per row once and an O(d^3) eigendecomposition; held
rows are rotated once, streamed ones pay two d x d x K products per evaluation. It is used for
at most `PRECONDITION_MAX_FEATURES` features and at least `PRECONDITION_ROWS_PER_FEATURE` rows
per feature (with fewer rows the penalty already evens out the curvature, and measured on
1,280 features and 1,200 rows the basis cost more evaluations than it saved). Without a basis,
p = sqrt((S + 1 / C) / S) scales the penalty's curvature to the data's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from featx.classify.lbfgs import HISTORY, Batch, minimise
from featx.classify.probe_newton import newton

__all__ = [
    "TOL",
    "Blocks",
    "PRECONDITION_MAX_FEATURES",
    "PRECONDITION_ROWS_PER_FEATURE",
    "BATCH_BYTES",
    "BATCH_FLOPS",
    "Design",
    "LinearModel",
    "PATH_GROUP",
    "PathStep",
    "balanced_weights",
    "batch_size",
    "eigenbasis",
    "evaluate",
    "objective",
    "solve_batch",
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
"""Below this many rows per feature `eigenbasis` returns None: with few rows per feature the
penalty already evens out the curvature, and the basis costs evaluations (docs/probe.md)."""

PATH_GROUP = 45
"""At most this many consecutive C values of a path are solved as one batch."""

NEWTON_MAX_UNKNOWNS = 512
"""Problems with more unknowns ((d + 1) K) never switch to Newton's method: its Hessian grows
as their square and its factorisation as their cube."""

BATCH_BYTES = 256 << 20
"""The memory a batch of problems may hold (L-BFGS state and one evaluation's logits)."""

BATCH_FLOPS = 2e8
"""The floating-point operations of one batched evaluation (4 rows x d x K per problem) up to
which a batch of held rows grows."""

CHUNK_ROWS_GUESS = 65536
"""Rows per block assumed for a streamed design when sizing a batch."""

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
    blocks: Blocks,
    mean: torch.Tensor,
    scale: torch.Tensor,
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
    return V.to(mean.dtype), s2.clamp_min(0).to(mean.dtype)


@dataclass
class Design:
    """The rows of one fit as the solver reads them, and the solver's variables on them.

    The solver's weights Q act on standardised features rotated into their eigenbasis when `V`
    is set (W = V Q), else on standardised features (W = Q). Held (`held`: one tensor in
    memory), the rows are standardised and rotated once, and an evaluation is two products with
    them; streamed, each block is read raw and the standardisation and rotation are folded into
    the weights instead. Make with `Design.build`."""

    blocks: Blocks
    mean: torch.Tensor
    scale: torch.Tensor
    total_weight: float
    V: torch.Tensor | None = None
    s2: torch.Tensor | None = None  # the eigenvalues that go with V
    held: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def build(
        cls,
        blocks: Blocks,
        mean: torch.Tensor,
        scale: torch.Tensor,
        total_weight: float,
        *,
        precondition: bool = True,
        hold: bool = False,
    ) -> Design:
        """With `precondition`, in the eigenbasis (when `eigenbasis` gives one); with `hold`,
        the standardised rows kept in memory (a copy of the rows)."""
        basis = eigenbasis(blocks, mean, scale) if precondition else None
        V, s2 = basis if basis is not None else (None, None)
        design = cls(blocks, mean, scale, total_weight, V, s2)
        if hold:
            parts = list(blocks())
            X = torch.cat([X for X, _, _ in parts]).to(mean.dtype)
            Z = (X - mean) / scale
            y = torch.cat([y for _, y, _ in parts])
            w = None if parts[0][2] is None else torch.cat([w for _, _, w in parts])
            design.held = (Z if V is None else Z @ V, y, w)
        return design

    def weights(self, Q: torch.Tensor) -> torch.Tensor:
        """W on standardised features from the solver's Q, for (d, K) or (B, d, K)."""
        return Q if self.V is None else torch.matmul(self.V, Q)

    def variables(self, W: torch.Tensor) -> torch.Tensor:
        return W if self.V is None else torch.matmul(self.V.T, W)

    def curvature(self) -> torch.Tensor:
        """The data part of the Hessian's diagonal in Q (times S): the eigenvalues, or S for
        standardised features without a basis."""
        if self.s2 is not None:
            return self.s2
        return self.mean.new_full(self.mean.shape, self.total_weight)


def evaluate(
    design: Design, Q: torch.Tensor, b: torch.Tensor, inv_C: torch.Tensor, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """F for B problems at once (Q (B, d, K), b (B, K), 1 / C (B,)) in one pass over the rows:
    losses (B,) and, with `grad`, gradients with respect to Q and b."""
    B, d, K = Q.shape
    if design.held is not None:
        W, c, rows = Q, b, [design.held]
    else:  # fold the standardisation (and rotation) into raw weights
        W = design.weights(Q) / design.scale[:, None]
        c, rows = b - torch.einsum("d,bdk->bk", design.mean, W), design.blocks()
    # class-major rows (K x B, d): the softmax then runs over the outermost axis, which is
    # several times faster than over a last axis of K values
    W, c = W.permute(2, 0, 1).reshape(K * B, d).contiguous(), c.T.reshape(K * B, 1)
    data_loss = Q.new_zeros(B)
    # contiguous, unlike zeros_like of a permuted W: products into strided outputs are slow
    gW, gc = (W.new_zeros(W.shape), c.new_zeros(c.shape)) if grad else (None, None)
    for X, y, w in rows:
        X = X.to(Q.dtype)
        logp = torch.log_softmax(torch.addmm(c, W, X.T).view(K, B, -1), dim=0)
        at = y.view(1, 1, -1).expand(1, B, -1)
        picked = logp.gather(0, at).squeeze(0)
        data_loss -= picked.sum(1) if w is None else picked @ w
        if grad:
            G = logp.exp_()
            G.scatter_add_(0, at, G.new_full(at.shape, -1.0))
            if w is not None:
                G *= w
            G = G.view(K * B, -1)
            gW.addmm_(G, X)
            gc += G.sum(1, keepdim=True)
    S = design.total_weight
    loss = (data_loss + (Q * Q).sum((1, 2)) * inv_C / 2) / S
    if not grad:
        return loss, None, None
    gW, gc = gW.view(K, B, d).permute(1, 2, 0), gc.view(K, B).T
    if design.held is None:  # back from raw weights: W_raw = W / scale, c = b - mean W_raw
        gW = design.variables((gW - design.mean[:, None] * gc[:, None, :]) / design.scale[:, None])
    return loss, (gW + Q * inv_C[:, None, None]) / S, gc / S


def objective(
    blocks: Blocks,
    model: LinearModel,
    C: float,
    total_weight: float,
    grad: bool = True,
) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
    """F(W, b) of one model and, with `grad`, its gradients with respect to W and b."""
    design = Design(blocks, model.mean, model.scale, total_weight)
    inv_C = model.W.new_full((1,), 1 / C)
    loss, gW, gb = evaluate(design, model.W[None], model.b[None], inv_C, grad)
    return float(loss[0]), None if gW is None else gW[0], None if gb is None else gb[0]


@dataclass
class PathStep:
    """One solved C: its model and the optimiser's effort (`seconds`: its share, by
    evaluations, of the time of the batch it was solved in)."""

    C: float
    model: LinearModel
    loss: float
    iterations: int
    evaluations: int
    seconds: float


def _meets_rule(design: Design, gQ: torch.Tensor, gb: torch.Tensor, tol: float) -> torch.Tensor:
    """The stopping rule on the gradient with respect to W = V Q and b: largest entry <= tol.
    In a basis, |V g|_max <= |g|_2 and |V g|_max >= |g|_2 / sqrt(d K) settle most problems
    without the product V g."""
    ok = gb.abs().amax(1) <= tol
    if design.V is None:
        return ok & (gQ.abs().amax((1, 2)) <= tol)
    norm = gQ.flatten(1).norm(dim=1)
    sure = ok & (norm <= tol)
    maybe = ok & ~sure & (norm <= tol * gQ[0].numel() ** 0.5)
    if maybe.any():
        sure[maybe] = design.weights(gQ[maybe]).abs().amax((1, 2)) <= tol
    return sure


def solve_batch(
    design: Design,
    Cs: list[float],
    init: LinearModel | list[LinearModel],
    *,
    max_iter: int = 1000,
    tol: float = TOL,
) -> list[PathStep]:
    """Minimise F at every C of `Cs` from `init`'s W and b (one model, or one per C) as one
    batch (`lbfgs.minimise`), in scaled variables P = p Q, p = sqrt((curvature + 1 / C) / S):
    in the eigenbasis the Hessian in P is about the identity (see the module's notes); without
    one, p scales the penalty's curvature to the data's. Each stops at the first point whose
    gradient with respect to W and b has no entry above `tol`, or after `max_iter` iterations.
    """
    start = time.perf_counter()
    inits = init if isinstance(init, list) else [init] * len(Cs)
    d, K = inits[0].W.shape
    dtype = inits[0].W.dtype
    inv_C = torch.tensor([1 / C for C in Cs], dtype=dtype, device=inits[0].W.device)
    S = design.total_weight
    p = ((design.curvature()[None, :] + inv_C[:, None]) / S).sqrt()[:, :, None]
    Q0 = design.variables(torch.stack([m.W for m in inits]))
    x0 = torch.cat([(p * Q0).flatten(1), torch.stack([m.b for m in inits])], dim=1)

    def objective_at(x: torch.Tensor, ids: torch.Tensor):
        P, b = x[:, : d * K].view(-1, d, K), x[:, d * K :]
        loss, gQ, gb = evaluate(design, P / p[ids], b, inv_C[ids])
        met = _meets_rule(design, gQ, gb, tol)
        return loss, torch.cat([(gQ / p[ids]).flatten(1), gb], dim=1), met

    change = 1e-14 if dtype == torch.float64 else 1e-9
    switch = min(max_iter, newton_after(design, K))
    out = minimise(objective_at, x0, max_iter=switch, tolerance_change=change)
    Q = out.x[:, : d * K].view(-1, d, K) / p
    for i in torch.nonzero(~out.converged & (out.iterations == switch)).flatten().tolist():
        _finish_with_newton(design, out, i, Q, Cs[i], max_iter, tol)
    seconds = time.perf_counter() - start
    share = out.evaluations.to(torch.float64) / out.evaluations.sum()
    W = design.weights(Q)
    return [
        PathStep(
            C,
            LinearModel(W[i].clone(), out.x[i, d * K :].clone(), design.mean, design.scale),
            float(out.loss[i]),
            int(out.iterations[i]),
            int(out.evaluations[i]),
            seconds * float(share[i]),
        )  # fmt: skip
        for i, C in enumerate(Cs)
    ]


def _finish_with_newton(
    design: Design, out: Batch, i: int, Q: torch.Tensor, C: float, max_iter: int, tol: float
) -> None:
    """Problem `i` of a batch, stopped by L-BFGS at `newton_after` iterations, finished with
    Newton's method: updates `out` and `Q` in place."""
    d = Q.shape[1]
    b = out.x[i, d * Q.shape[2] :]
    Q[i], b[:], out.loss[i], steps, evaluations = newton(
        design.held, design.total_weight, C, Q[i], b.clone(),
        max_iter=max_iter - int(out.iterations[i]),
        rule=lambda gQ, gb: bool(_meets_rule(design, gQ[None], gb[None], tol)[0]),
    )  # fmt: skip
    out.iterations[i] += steps
    out.evaluations[i] += evaluations


def newton_after(design: Design, n_classes: int) -> int:
    """The L-BFGS iterations after which a problem still running finishes with Newton's method
    (`probe_newton`): about the evaluations one Newton step costs, ((d + 1) K) / 4; never for
    streamed rows or more than `NEWTON_MAX_UNKNOWNS` unknowns."""
    unknowns = (len(design.mean) + 1) * n_classes
    if design.held is None or unknowns > NEWTON_MAX_UNKNOWNS:
        return 1 << 62
    return max(1, unknowns // 4)


def batch_size(design: Design, n_classes: int, budget: int = BATCH_BYTES) -> int:
    """How many consecutive C values of a path to solve as one batch: at most `PATH_GROUP`,
    within `budget` bytes (L-BFGS keeps about 2 x history + 8 vectors of (d + 1) K values per
    problem, an evaluation 3 of rows x K), and for held rows within `BATCH_FLOPS` per
    evaluation. Below that size an evaluation costs about the same for one problem as for
    several (its products are too thin to keep the cores busy), so a batch is nearly free;
    above it, cost grows with the batch, and the cold starts of a batch's larger C values
    cost more than batching saves."""
    rows = len(design.held[0]) if design.held is not None else CHUNK_ROWS_GUESS
    d = len(design.mean)
    per_problem = ((2 * HISTORY + 8) * (d + 1) + 3 * rows) * n_classes
    fits = budget // (per_problem * design.mean.element_size())
    if design.held is not None:
        fits = min(fits, int(BATCH_FLOPS // (4 * rows * d * n_classes)))
    return int(min(max(fits, 1), PATH_GROUP))


def _from_predecessors(
    design: Design, steps: list[PathStep], max_iter: int, tol: float
) -> list[PathStep]:
    """The minimum of F falls as C grows, so a step whose loss is above that of the previous
    C's solution (evaluated at its own C) stopped short: a gradient rule can hold far from the
    minimum where F is flat (weak penalty, nearly separable classes). Such steps are solved
    again from the previous solution, until none is left. (A batch's first step started at
    its predecessor and L-BFGS only descends, so it never stopped short.)"""
    for _ in range(len(steps) - 1):
        previous = [step.model for step in steps[:-1]]
        inv_C = design.mean.new_tensor([1 / step.C for step in steps[1:]])
        Q = design.variables(torch.stack([m.W for m in previous]))
        at_previous, _, _ = evaluate(design, Q, torch.stack([m.b for m in previous]), inv_C, False)
        short = [i for i in range(1, len(steps)) if float(at_previous[i - 1]) < steps[i].loss]
        if not short:
            break
        again = solve_batch(design, [steps[i].C for i in short], [previous[i - 1] for i in short],
                            max_iter=max_iter, tol=tol)  # fmt: skip
        for i, step in zip(short, again, strict=True):
            step.iterations += steps[i].iterations
            step.evaluations += steps[i].evaluations
            step.seconds += steps[i].seconds
            steps[i] = step
    return steps


def solve_path(
    design: Design,
    Cs: Iterable[float],
    n_classes: int,
    *,
    max_iter: int = 1000,
    tol: float = TOL,
    init: LinearModel | None = None,
    group: int | None = None,
) -> Iterator[PathStep]:
    """Solve the C values in increasing order, in batches of `group` consecutive values (by
    default `batch_size`), each batch started at the previous batch's largest-C solution (or
    `init`, else zero), then steps that stopped short re-solved from their predecessor's
    solution; yields every step."""
    mean = design.mean
    if init is None:
        W = torch.zeros((len(mean), n_classes), dtype=mean.dtype, device=mean.device)
        init = LinearModel(W, torch.zeros_like(W[0]), mean, design.scale)
    Cs = sorted(float(c) for c in Cs)
    group = group or batch_size(design, n_classes)
    for first in range(0, len(Cs), group):
        steps = solve_batch(design, Cs[first : first + group], init, max_iter=max_iter, tol=tol)
        steps = _from_predecessors(design, steps, max_iter, tol)
        init = steps[-1].model
        yield from steps
