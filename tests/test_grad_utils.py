"""Shared gradient utilities against dense linear algebra and closed-form values."""

import math

import torch

from ecif.grad import angular_distance, conjugate_gradient, lanczos_eigs


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(n, dtype=torch.float64)


def test_cg_solves_batched_systems():
    a = _spd(30)
    b = torch.randn(4, 30, dtype=torch.float64)
    res = conjugate_gradient(lambda v: v @ a.T, b, tol=1e-12, max_iter=200, batch_dims=1)
    expected = torch.linalg.solve(a, b.T).T
    assert res.converged
    assert torch.allclose(res.x, expected, atol=1e-8)


def test_cg_with_preconditioner_uses_fewer_iterations():
    a = _spd(60, seed=1) + torch.diag(torch.linspace(1, 1e4, 60, dtype=torch.float64))
    b = torch.randn(60, dtype=torch.float64)
    plain = conjugate_gradient(lambda v: a @ v, b, tol=1e-10, max_iter=1000)
    d = torch.diagonal(a)
    pre = conjugate_gradient(lambda v: a @ v, b, precond=lambda r: r / d, tol=1e-10, max_iter=1000)
    assert torch.allclose(pre.x, torch.linalg.solve(a, b), atol=1e-6)
    assert pre.iterations < plain.iterations


def test_lanczos_matches_eigh():
    a = _spd(40, seed=2)
    vals, vecs = lanczos_eigs(lambda v: a @ v, (40,), k=3, iters=40)
    ref = torch.linalg.eigvalsh(a).flip(0)[:3]
    assert torch.allclose(vals, ref, rtol=1e-8)
    for lam, v in zip(vals, vecs):
        assert torch.allclose(a @ v, lam * v, atol=1e-6 * float(lam))


def test_angular_distance_known_values_and_scale_invariance():
    e1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    e2 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert math.isclose(float(angular_distance(e1, e2)), 0.5, rel_tol=1e-12)
    assert math.isclose(float(angular_distance(e1, -e1)), 1.0, rel_tol=1e-12)
    assert math.isclose(float(angular_distance(e1, e1 + e2)), 0.25, rel_tol=1e-12)
    x = torch.randn(5, 7, dtype=torch.float64)
    y = torch.randn(5, 7, dtype=torch.float64)
    base = angular_distance(x, y)
    assert torch.allclose(angular_distance(3.7 * x, 0.2 * y), base, atol=1e-12)
    ref = torch.arccos(torch.nn.functional.cosine_similarity(x, y, dim=-1)) / math.pi
    assert torch.allclose(base, ref, atol=1e-10)
