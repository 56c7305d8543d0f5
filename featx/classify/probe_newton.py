"""Newton's method for one multinomial logistic problem on held rows, for the C values where
L-BFGS crawls.

At weak regularisation the Hessian of F has directions of very small curvature (rows the model
already classifies with confidence no longer bend the loss), and L-BFGS needs hundreds of
iterations where Newton needs a handful. With (d + 1) K unknowns, one Newton step costs about
rows x ((d + 1) K)^2 operations for the Hessian and ((d + 1) K)^3 / 3 for its Cholesky factor:
worth it for small layers only (`probe_solver.NEWTON_MAX_UNKNOWNS`).

The variables are those of the held design (Q on standardised, rotated rows, and b). A common
shift of every class's weights or intercepts does not change the softmax: the Hessian is
singular (intercepts) or nearly so (weights: only the penalty) along those shifts. The solution
and every iterate have zero sum over the classes, so the step is solved with c |sum_k theta_k|^2
added to F, which lifts those directions and leaves the step in the others unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["newton"]

ARMIJO = 1e-4
MAX_HALVINGS = 40


def _loss_grad(Z, y, s, S, Q, b, inv_C):
    """F, its gradient ((d + 1, K): Q's rows, then b's) and the softmax probabilities."""
    logp = torch.log_softmax(torch.addmm(b, Z, Q), dim=1)
    loss = (-(s * logp.gather(1, y[:, None])[:, 0]).sum() + (Q * Q).sum() * inv_C / 2) / S
    P = logp.exp_()
    R = P.clone()
    R[torch.arange(len(y), device=Z.device), y] -= 1
    R *= s[:, None]
    return float(loss), torch.cat([Z.T @ R + Q * inv_C, R.sum(0, keepdim=True)]) / S, P


def _hessian(Z, s, S, P, inv_C):
    """The Hessian of F with the unknowns in class-major order (class k's d + 1 together)."""
    n, d = Z.shape
    K = P.shape[1]
    Zt = torch.cat([Z, Z.new_ones((n, 1))], dim=1)
    M = (Zt[:, None, :] * P[:, :, None]).reshape(n, K * (d + 1))
    H = -(M.T @ (M * s[:, None])).view(K, d + 1, K, d + 1)
    own = torch.matmul((Zt * s[:, None]).T[None] * P.T[:, None, :], Zt)  # (K, d + 1, d + 1)
    for k in range(K):
        H[k, :, k, :] += own[k]
    H /= S
    for k in range(K):
        H[k, :d, k, :d].diagonal().add_(inv_C / S)
    # + c |sum_k theta_k|^2: zero with its gradient where the unknowns sum to zero over the
    # classes (as every iterate does), and lifts the directions the softmax cannot see
    c = float(H.view(K * (d + 1), -1).diagonal().max())
    H += c * torch.eye(d + 1, dtype=H.dtype, device=H.device)[None, :, None, :]
    return H.view(K * (d + 1), K * (d + 1))


def newton(
    held: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    total_weight: float,
    C: float,
    Q: torch.Tensor,
    b: torch.Tensor,
    *,
    max_iter: int,
    rule: Callable[[torch.Tensor, torch.Tensor], bool],
) -> tuple[torch.Tensor, torch.Tensor, float, int, int]:
    """Newton steps with backtracking from (Q, b) until `rule(gQ, gb)` holds or `max_iter`
    steps: (Q, b, loss, steps, evaluations)."""
    Z, y, w = held
    d, K = Q.shape
    s = torch.ones(len(y), dtype=Z.dtype, device=Z.device) if w is None else w
    S, inv_C = total_weight, 1.0 / C
    loss, grad, P = _loss_grad(Z, y, s, S, Q, b, inv_C)
    evaluations, steps = 1, 0
    while steps < max_iter and not rule(grad[:d], grad[d]):
        factor, info = torch.linalg.cholesky_ex(_hessian(Z, s, S, P, inv_C))
        if int(info):
            break
        g = grad.T.reshape(-1, 1)  # class-major, as the Hessian
        step = torch.cholesky_solve(-g, factor).view(K, d + 1).T
        slope, t = float(g[:, 0] @ step.T.reshape(-1)), 1.0
        for _ in range(MAX_HALVINGS):
            trial = Q + t * step[:d], b + t * step[d]
            trial_loss, trial_grad, trial_P = _loss_grad(Z, y, s, S, *trial, inv_C)
            evaluations += 1
            if trial_loss <= loss + ARMIJO * t * slope:
                break
            t /= 2
        else:
            break
        steps += 1
        (Q, b), loss, grad, P = trial, trial_loss, trial_grad, trial_P
    return Q, b, loss, steps, evaluations
