"""The shared gradient core against dense linear algebra and closed-form derivatives."""

import math

import pytest
import torch

from ecif.grad import (
    FunctionObjective,
    angular_distance,
    block_conjugate_gradient,
    cg_direction,
    cholesky_with_damping,
    conjugate_gradient,
    damped_cholesky,
    dense_direction,
    dense_hessian,
    gauss_newton_product,
    hvp,
    jacobian,
    jvp,
    lanczos_eigs,
    log_norm_ratio,
    newton,
    per_sample_grads,
    vjp,
)


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


def test_block_cg_solves_every_system_with_fewer_products():
    # a spectrum with a few outliers (as a Hessian's): the block shares their Krylov directions
    g = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))[0]
    spectrum = torch.cat([torch.logspace(2, 4, 12, dtype=torch.float64), torch.ones(188)])
    a = basis @ torch.diag(spectrum * torch.linspace(1, 3, 200, dtype=torch.float64)) @ basis.T
    b = torch.randn(8, 200, generator=g, dtype=torch.float64)
    b[7] = 2.0 * b[3]  # a dependent right-hand side: its direction is dropped, not divided by 0
    d = torch.diagonal(a)
    seen = []
    res = block_conjugate_gradient(
        lambda v: v @ a.T, b, precond=lambda r: r / d, tol=1e-10, max_iter=300, progress=seen.append
    )
    assert res.converged and res.x.shape == b.shape
    torch.testing.assert_close(res.x, torch.linalg.solve(a, b.T).T, rtol=1e-7, atol=1e-9)
    assert len(seen) == res.iterations and seen[-1] <= 1e-10
    single = [
        conjugate_gradient(lambda v: a @ v, v, precond=lambda r: r / d, tol=1e-10, max_iter=300)
        for v in b
    ]
    assert all(r.converged for r in single)
    assert len(b) * res.iterations < sum(r.iterations for r in single)


def test_block_cg_reports_an_operator_it_cannot_solve():
    a = torch.diag(torch.tensor([1.0, -1.0, 2.0, 3.0], dtype=torch.float64))  # indefinite
    b = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    res = block_conjugate_gradient(lambda v: v @ a.T, b, tol=1e-8, max_iter=20)
    assert not res.converged


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


def _quartic(a):
    """f(theta) = 0.5 theta^T A theta + sum theta^4 / 4: Hessian A + diag(3 theta^2)."""
    return lambda th: 0.5 * th @ a @ th + (th**4).sum() / 4


def test_hvp_and_dense_hessian_equal_the_closed_form_hessian():
    a = _spd(6, seed=3)
    theta = torch.randn(6, dtype=torch.float64)
    h = a + torch.diag(3 * theta**2)
    v = torch.randn(4, 6, dtype=torch.float64)
    assert torch.allclose(hvp(_quartic(a), theta, v[0]), h @ v[0], atol=1e-12)
    assert torch.allclose(hvp(_quartic(a), theta, v), v @ h, atol=1e-12)  # K vectors at once
    assert torch.allclose(dense_hessian(_quartic(a), theta), h, atol=1e-12)
    obj = FunctionObjective(_quartic(a))
    value, grad = obj.value_and_grad(theta)
    assert value == float(_quartic(a)(theta))
    assert torch.allclose(grad, a @ theta + theta**3, atol=1e-12)


def test_jvp_vjp_jacobian_and_gauss_newton_equal_explicit_jacobians():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64)
    theta = torch.randn(3, generator=g, dtype=torch.float64)

    def f(th):
        return torch.tanh(a @ th)

    jac = (1 - torch.tanh(a @ theta) ** 2)[:, None] * a  # d tanh(A theta) / d theta
    v, u = torch.randn(3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.allclose(jvp(f, theta, v)[1], jac @ v, atol=1e-12)
    assert torch.allclose(vjp(f, theta, u)[1], jac.T @ u, atol=1e-12)
    assert torch.allclose(jacobian(f, theta), jac, atol=1e-12)
    w = torch.rand(5, dtype=torch.float64) + 0.5  # loss sum w_i out_i^2 / 2: Hessian diag(w)
    gn = gauss_newton_product(f, theta, v, lambda out, du: w * du)
    assert torch.allclose(gn, jac.T @ (w * (jac @ v)), atol=1e-12)

    def loss(out):
        return 0.5 * (w * out**2).sum()

    same = gauss_newton_product(f, theta, v, lambda out, du: hvp(loss, out, du))
    assert torch.allclose(same, gn, atol=1e-12)


def test_per_sample_grads_of_least_squares_and_of_a_module():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64)
    got = per_sample_grads(lambda p, xi, yi: 0.5 * (p @ xi - yi) ** 2, w, x, y)
    assert torch.allclose(got, (x @ w - y)[:, None] * x, atol=1e-12)  # (w.x_i - y_i) x_i
    lin = torch.nn.Linear(3, 1, bias=True).double()
    params = {k: p.detach() for k, p in lin.named_parameters()}

    def one(p, xi, yi):
        out = torch.func.functional_call(lin, p, (xi[None],))[0, 0]
        return 0.5 * (out - yi) ** 2

    grads = per_sample_grads(one, params, x, y)
    err = (x @ params["weight"][0] + params["bias"][0] - y)[:, None]
    assert torch.allclose(grads["weight"][:, 0], err * x, atol=1e-12)
    assert torch.allclose(grads["bias"][:, 0], err[:, 0], atol=1e-12)


@pytest.mark.parametrize("how", ["dense", "cg"])
def test_shared_newton_reaches_the_minimiser_of_a_smooth_convex_function(how):
    a = _spd(8, seed=6)
    b = torch.randn(8, dtype=torch.float64)

    def f(th):  # strictly convex, not quadratic: sum log cosh plus a quadratic
        return torch.log(torch.cosh(th)).sum() + 0.5 * th @ a @ th - b @ th

    obj = FunctionObjective(f)
    direction = dense_direction(obj) if how == "dense" else cg_direction(obj, rel_tol=1e-10)
    theta, _, grad, its, passes, stop = newton(
        obj, torch.zeros(8, dtype=torch.float64), direction, 1e-12, 50
    )
    assert stop == "tol" and its >= 2 and passes > its
    assert torch.allclose(torch.tanh(theta) + a @ theta, b, atol=1e-11)  # gradient = 0


def test_damped_cholesky_factors_spd_and_damps_indefinite():
    a = _spd(5, seed=7)
    assert torch.allclose(damped_cholesky(a), torch.linalg.cholesky(a))
    indef = a - 2 * float(torch.linalg.eigvalsh(a)[0]) * torch.eye(5, dtype=torch.float64)
    factor = damped_cholesky(indef)
    mu = float(((factor @ factor.T) - indef).diagonal().mean())
    assert mu > 0 and torch.allclose(
        factor @ factor.T, indef + mu * torch.eye(5, dtype=torch.float64)
    )


def test_cholesky_with_damping_says_what_it_added():
    a = _spd(5, seed=7)
    factor, mu = cholesky_with_damping(a)
    assert mu == 0.0 and torch.allclose(factor, torch.linalg.cholesky(a))
    lowest = float(torch.linalg.eigvalsh(a)[0])
    indef = a - 1.5 * lowest * torch.eye(5, dtype=torch.float64)  # smallest eigenvalue -lowest/2
    factor, mu = cholesky_with_damping(indef)
    assert mu > 0.5 * lowest  # enough to make it positive definite
    assert torch.allclose(factor @ factor.T, indef + mu * torch.eye(5, dtype=torch.float64))


def test_log_norm_ratio_and_the_renamed_hvp():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[6.0, 8.0], [0.0, 0.5]], dtype=torch.float64)
    assert torch.allclose(
        log_norm_ratio(a, b), torch.tensor([math.log(2), math.log(2)], dtype=torch.float64)
    )
    with pytest.warns(DeprecationWarning, match="ecif.grad.hvp"):
        from ecif.grad import flat_hvp
    assert flat_hvp is hvp
