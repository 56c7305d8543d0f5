"""The probe's optimisers on their own: the batched L-BFGS, Newton's finish for small layers,
and the temperature fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import featx.classify.probe_solver as solver
from featx.classify.lbfgs import minimise
from featx.classify.probe_newton import _hessian, _loss_grad
from featx.classify.probe_scores import fit_temperature
from featx.classify.probe_solver import Design, LinearModel, objective, solve_path, standardiser


def _quadratics(B: int, n: int, seed: int):
    """B convex quadratics 0.5 x'A x - c'x of different conditioning, and their minimisers."""
    rng = np.random.default_rng(seed)
    As, cs = [], []
    for j in range(B):
        U, _ = np.linalg.qr(rng.normal(size=(n, n)))
        As.append(U @ np.diag(np.logspace(0, 1 + j / 2, n)) @ U.T)
        cs.append(rng.normal(size=n))
    A, c = torch.tensor(np.array(As)), torch.tensor(np.array(cs))
    return A, c, torch.linalg.solve(A, c)


def test_batched_lbfgs_solves_each_problem_as_if_alone():
    """Problems in one batch stop on their own (different counts), reach their own minimiser,
    and take the same steps as when solved alone."""
    A, c, best = _quadratics(4, 12, seed=0)

    def evaluate(x, ids):
        Ax = torch.einsum("bij,bj->bi", A[ids], x)
        g = Ax - c[ids]
        return 0.5 * (x * Ax).sum(1) - (c[ids] * x).sum(1), g, g.abs().amax(1) <= 1e-6

    together = minimise(evaluate, torch.zeros(4, 12, dtype=torch.float64), max_iter=500)
    assert together.converged.all()
    torch.testing.assert_close(together.x, best, atol=1e-5, rtol=0)
    assert len(set(together.iterations.tolist())) > 1
    for j in range(4):

        def alone(x, ids, j=j):
            return evaluate(x, torch.full_like(ids, j))

        single = minimise(alone, torch.zeros(1, 12, dtype=torch.float64), max_iter=500)
        assert int(single.iterations[0]) == int(together.iterations[j])
        torch.testing.assert_close(single.x[0], together.x[j], atol=1e-12, rtol=0)


def test_newton_hessian_matches_autograd():
    """The Hessian Newton's method factors is F's, plus c |sum over classes|^2."""
    gen = torch.Generator().manual_seed(0)
    n, d, K = 50, 4, 3
    Z = torch.randn(n, d, dtype=torch.float64, generator=gen)
    y = torch.randint(0, K, (n,), generator=gen)
    s = torch.rand(n, dtype=torch.float64, generator=gen) + 0.5
    S, inv_C = float(s.sum()), 0.7
    Q = torch.randn(d, K, dtype=torch.float64, generator=gen)
    b = torch.randn(K, dtype=torch.float64, generator=gen)

    def F(x):
        theta = x.view(K, d + 1).T
        ce = torch.nn.functional.cross_entropy(Z @ theta[:d] + theta[d], y, reduction="none")
        return ((s * ce).sum() + (theta[:d] ** 2).sum() * inv_C / 2) / S

    expected = torch.autograd.functional.hessian(F, torch.cat([Q, b[None]]).T.reshape(-1))
    _, _, P = _loss_grad(Z, y, s, S, Q, b, inv_C)
    H = _hessian(Z, s, S, P, inv_C)
    ones = torch.ones(K, K, dtype=torch.float64)
    lift = float(expected.diagonal().max()) * torch.kron(ones, torch.eye(d + 1).double())
    torch.testing.assert_close(H, expected + lift, atol=1e-12, rtol=1e-10)


def _digits(columns: int):
    X, y = load_digits(return_X_y=True)
    X = X[:, X.std(0) > 0][:, :columns]
    Xt, yt = torch.tensor(X), torch.tensor(y)
    blocks = lambda: [(Xt, yt, None)]  # noqa: E731
    mean, scale = standardiser(blocks, torch.float64)
    return blocks, mean, scale, float(len(y)), StandardScaler().fit_transform(X), y


@pytest.mark.parametrize("C", [30.0, 3000.0])
def test_newton_finish_reaches_the_lbfgs_minimum_and_sklearn(monkeypatch, C):
    """On a small layer (31 unknowns per class) at weak regularisation, problems still running
    after `newton_after` iterations are finished by Newton: the same minimum as L-BFGS alone
    at tight tolerance, and a loss at most scikit-learn's."""
    blocks, mean, scale, total, Xs, y = _digits(30)
    design = Design.build(blocks, mean, scale, total, hold=True)
    calls = []
    real = solver.newton
    monkeypatch.setattr(solver, "newton", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_newton = list(solve_path(design, [C], 10, tol=1e-7, max_iter=20000))[0]
    assert calls, "no problem reached Newton's method"
    monkeypatch.setattr(solver, "NEWTON_MAX_UNKNOWNS", 0)
    plain = list(solve_path(design, [C], 10, tol=1e-7, max_iter=20000))[0]
    assert abs(with_newton.loss - plain.loss) <= 1e-6 * plain.loss
    clf = LogisticRegression(C=C, max_iter=1000).fit(Xs, y)
    theirs = LinearModel(torch.tensor(clf.coef_.T), torch.tensor(clf.intercept_), mean, scale)
    assert with_newton.loss <= objective(blocks, theirs, C, total, grad=False)[0] * (1 + 1e-6)


def test_temperature_is_the_likelihood_minimum():
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 5, (400,), generator=gen)
    logits = torch.randn(400, 5, generator=gen, dtype=torch.float64)
    logits[torch.arange(400), y] += 1.5
    logits *= 4  # overconfident: the fitted T is above 1
    T = fit_temperature(logits, y)
    grid = np.exp(np.linspace(np.log(T) - 0.05, np.log(T) + 0.05, 201))
    nll = [float(torch.nn.functional.cross_entropy(logits / t, y)) for t in grid]
    assert T > 1
    assert abs(np.log(grid[int(np.argmin(nll))]) - np.log(T)) <= 1e-3
