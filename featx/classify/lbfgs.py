"""L-BFGS over a batch of independent problems at once, in torch.

The problems share one evaluation: `evaluate(x, ids)` gets the points of the problems `ids`
(rows of `x`) and returns their losses, gradients and whether each point meets the caller's
stopping rule, so that B problems cost one pass over the data instead of B. Each problem keeps
its own curvature pairs, step and line search (backtracking to the Armijo condition, by
quadratic interpolation); a problem leaves the batch when its point meets the rule, its loss
or step stops changing, its line search fails, or it has used `max_iter` iterations, and the
next evaluations carry only the problems still running. The loss must be convex (every
accepted step then has positive curvature, s.y > 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["HISTORY", "Batch", "minimise"]

Evaluate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(points (b, N), problem ids (b,)) -> (losses (b,), gradients (b, N), met rule (b,) bool)."""

ARMIJO = 1e-4
HISTORY = 10
MAX_BACKTRACKS = 30


@dataclass
class Batch:
    """The result, per problem: final point, loss, iterations, evaluations, and whether the
    point meets the stopping rule."""

    x: torch.Tensor
    loss: torch.Tensor
    iterations: torch.Tensor
    evaluations: torch.Tensor
    converged: torch.Tensor


class _History:
    """The last `m` curvature pairs of every running problem (a ring, shared positions), and
    the L-BFGS inverse Hessian in compact form (Byrd, Nocedal and Schnabel 1994): a few
    batched products whatever `m`, where the two-loop recursion takes 4 m small operations."""

    def __init__(self, m: int, shape: tuple[int, int], like: torch.Tensor) -> None:
        B, N = shape
        self.s = like.new_zeros((B, m, N))
        self.y = like.new_zeros((B, m, N))
        self.gamma = like.new_ones(B)
        self.count = 0

    def push(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Store (s, y); a pair without positive curvature is stored as zeros, which the
        compact form then ignores."""
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        valid = sy > 1e-10 * yy.clamp_min(torch.finfo(s.dtype).tiny)
        slot = self.count % self.s.shape[1]
        self.s[:, slot] = torch.where(valid[:, None], s, 0)
        self.y[:, slot] = torch.where(valid[:, None], y, 0)
        self.gamma = torch.where(valid, sy / torch.where(valid, yy, 1), self.gamma)
        self.count += 1

    def keep(self, rows: torch.Tensor) -> None:
        self.s, self.y, self.gamma = self.s[rows], self.y[rows], self.gamma[rows]

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """-H g, with H = gamma I + [S gamma Y] M [S gamma Y]^T the compact L-BFGS matrix."""
        m = self.s.shape[1]
        k = min(self.count, m)
        gamma = self.gamma[:, None]
        if k == 0:
            return -gamma * g
        order = [(self.count - k + i) % m for i in range(k)]  # oldest first
        S, Y = (
            (self.s, self.y) if k == m and order[0] == 0 else (self.s[:, order], self.y[:, order])
        )
        SY = S @ Y.transpose(1, 2)
        R = SY.triu()
        D = SY.diagonal(dim1=1, dim2=2)
        R.diagonal(dim1=1, dim2=2).copy_(torch.where(D == 0, 1, D))  # zero pairs: inert
        a, b = S @ g[:, :, None], Y @ g[:, :, None]
        u = torch.linalg.solve_triangular(R, a, upper=True)
        v = D[:, :, None] * u + gamma[:, :, None] * (Y @ (Y.transpose(1, 2) @ u) - b)
        p = torch.linalg.solve_triangular(R.transpose(1, 2), v, upper=False)
        Hg = gamma * g + (S.transpose(1, 2) @ p)[:, :, 0] - gamma * (Y.transpose(1, 2) @ u)[:, :, 0]
        return Hg.neg_()


def _line_search(
    evaluate: Evaluate,
    x: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    direction: torch.Tensor,
    step: torch.Tensor,
    ids: torch.Tensor,
    evaluations: torch.Tensor,
):
    """Backtrack each problem's step until its loss falls by the Armijo condition (or its
    trial point meets the stopping rule). Returns the new points, losses, gradients, rule
    flags, and which problems found no such step."""
    new_x, new_f, new_g = x.clone(), f.clone(), g.clone()
    met = torch.zeros_like(f, dtype=torch.bool)
    slope = (g * direction).sum(1)
    pending = torch.arange(len(x), device=x.device)
    for _ in range(MAX_BACKTRACKS):
        trial = x[pending] + step[pending, None] * direction[pending]
        f_t, g_t, met_t = evaluate(trial, ids[pending])
        evaluations[ids[pending]] += 1
        ok = met_t | (f_t <= f[pending] + ARMIJO * step[pending] * slope[pending])
        done = pending[ok]
        new_x[done], new_f[done], new_g[done], met[done] = trial[ok], f_t[ok], g_t[ok], met_t[ok]
        pending, f_t, t = pending[~ok], f_t[~ok], step[pending[~ok]]
        if not len(pending):
            return new_x, new_f, new_g, met, met.new_zeros(met.shape)
        # the minimum of the quadratic through f(0), f'(0) and f(t), kept in [0.1 t, 0.5 t]
        rise = f_t - f[pending] - slope[pending] * t
        fitted = -slope[pending] * t * t / (2 * rise.clamp_min(torch.finfo(t.dtype).tiny))
        step[pending] = torch.minimum(torch.maximum(fitted, 0.1 * t), 0.5 * t)
    failed = torch.zeros_like(met)
    failed[pending] = True
    return new_x, new_f, new_g, met, failed


def minimise(
    evaluate: Evaluate,
    x0: torch.Tensor,
    *,
    max_iter: int = 1000,
    history: int = HISTORY,
    tolerance_change: float = 1e-14,
) -> Batch:
    """Minimise B problems from the rows of `x0` (B, N) together."""
    B = len(x0)
    counts = x0.new_zeros(B, dtype=torch.long)
    out = Batch(x0.clone(), x0.new_zeros(B), counts, counts.clone(), counts.bool())
    ids = torch.arange(B, device=x0.device)
    x = x0.clone()
    f, g, met = evaluate(x, ids)
    stalled = torch.zeros_like(met)
    out.evaluations += 1
    memory = _History(history, tuple(x.shape), x)
    while len(ids):
        stop = met | stalled | (out.iterations[ids] >= max_iter)
        if stop.any():
            out.x[ids[stop]], out.loss[ids[stop]] = x[stop], f[stop]
            out.converged[ids[stop]] = met[stop]
            keep = ~stop
            ids, x, f, g, met = ids[keep], x[keep], f[keep], g[keep], met[keep]
            memory.keep(keep)
            if not len(ids):
                break
        direction = memory.direction(g)
        if memory.count == 0:  # no curvature known yet: a cautious first step
            step = (1 / g.abs().sum(1)).clamp_max(1.0)
        else:
            step = torch.ones_like(f)
        new_x, new_f, new_g, met, failed = _line_search(
            evaluate, x, f, g, direction, step, ids, out.evaluations
        )
        out.iterations[ids] += 1
        memory.push(new_x - x, new_g - g)
        stalled = (new_f - f).abs() <= tolerance_change
        stalled |= ((new_x - x).abs().amax(1) <= tolerance_change) | failed
        x, f, g = torch.where(failed[:, None], x, new_x), torch.where(failed, f, new_f), new_g
    return out
