"""Model-mode pair norms and self-influence from random probes, against d_n = H^-1 grad R_n
built densely from autograd (per-pair removal gradients, the exact Hessian)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ecif.engine.encoder_fit import fit_encoder
from ecif.engine.encoder_influence import ModelInverse
from ecif.engine.encoder_model import new_model
from ecif.engine.model_probes import probe_estimate
from ecif.engine.model_trace import query_gradient, query_loss, relative_influence
from ecif.grad import dense_hessian
from tests.test_engine_encoder import Reference, problem

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dense_solve(h: torch.Tensor):
    """ModelInverse.solve by the dense Hessian: g of shape (P,) or (K, P)."""
    return lambda g, progress=None, tol=None: (
        torch.linalg.solve(h, g.T).T if g.dim() == 2 else (torch.linalg.solve(h, g))
    )


@pytest.fixture(scope="module")
def fitted():
    part, fi, ft = problem(n=20)
    model = new_model(part, len(fi), lam=0.05, batch_size=8, seed=3, dtype=torch.float64)
    model = fit_encoder(model, fi, ft, tol=1e-10)
    ref = Reference(model, fi, ft)
    h = dense_hessian(ref.objective, model.theta)
    grads = torch.stack(
        [torch.func.grad(lambda th, n=n: ref.removal(th, n))(model.theta) for n in range(len(fi))]
    )
    d = torch.linalg.solve(h, grads.T).T  # d_n = H^-1 grad R_n, one row per pair
    truth = SimpleNamespace(norms=d.norm(dim=1).numpy(), self_inf=(grads * d).sum(1).numpy())
    # the solves by the dense Hessian (CG's accuracy is tested in test_engine_encoder), with
    # the model inverse's own K-FAC preconditioner for the whitening
    inv = ModelInverse(model, fi, ft)
    inv.solve = dense_solve(h)
    return model, SimpleNamespace(image=fi, text=ft), inv, truth


def test_probes_use_the_model_inverse_by_default(fitted):
    model, train, inv, truth = fitted
    est = probe_estimate(model, train, probes=2, whiten=True, seed=4)
    dense = probe_estimate(model, train, probes=2, whiten=True, inverse=inv, seed=4)
    # CG stops at a relative residual of 1e-4, so the error bound is norm-wise, not per entry
    # (one entry of 40, -0.0507 in rows up to 1.2, differed by 1.0e-3 of itself on one CPU)
    err = np.linalg.norm(est.through - dense.through, axis=1)
    assert (err <= 1e-3 * np.linalg.norm(dense.through, axis=1)).all(), err


def test_block_solve_equals_the_dense_hessian_solve(fitted):
    model, train, _, _ = fitted
    h = dense_hessian(Reference(model, train.image, train.text).objective, model.theta)
    rhs = torch.randn(6, model.num_params, generator=torch.Generator().manual_seed(1))
    rhs = rhs.to(torch.float64)
    inv = ModelInverse(model, train.image, train.text, tol=1e-9, max_iter=500)
    iterations = []
    got = inv.solve(rhs, progress=iterations.append)
    torch.testing.assert_close(got, torch.linalg.solve(h, rhs.T).T, rtol=1e-6, atol=1e-9)
    assert inv.info["converged"] and inv.info["curvature"] == "exact"
    assert len(iterations) == inv.info["iterations"] and iterations[-1] <= 1e-9


def test_probe_estimate_reports_the_solve_then_each_probe(fitted):
    model, train, _, _ = fitted
    inv = ModelInverse(model, train.image, train.text, tol=1e-6)
    residuals, ticks = [], []
    probe_estimate(
        model, train, probes=5, inverse=inv, progress=ticks.append, solve_progress=residuals.append
    )
    assert ticks == [1] * 5
    assert len(residuals) == inv.info["iterations"] > 1 and residuals[-1] <= 1e-6 < residuals[0]


def test_basis_probes_give_the_exact_norms_and_self_influence(fitted):
    model, train, inv, truth = fitted
    p = model.num_params
    basis = np.sqrt(p) * torch.eye(p, dtype=torch.float64)  # mean over K = P probes is exact
    plain = probe_estimate(model, train, probes=basis, whiten=False, inverse=inv)
    np.testing.assert_allclose(plain.norms(), truth.norms, rtol=1e-6)
    np.testing.assert_allclose(plain.self_influence(), truth.self_inf, rtol=1e-6)
    only = probe_estimate(model, train, probes=basis, whiten=False, along=False, inverse=inv)
    np.testing.assert_allclose(only.norms(), truth.norms, rtol=1e-6)  # half the passes
    with pytest.raises(ValueError, match="along=True"):
        only.self_influence()
    white = probe_estimate(model, train, probes=basis, whiten=True, inverse=inv)
    np.testing.assert_allclose(white.self_influence(), truth.self_inf, rtol=1e-6)
    with pytest.raises(ValueError, match="M = I"):
        white.norms()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_probes_estimate_them(fitted, seed):
    model, train, inv, truth = fitted
    plain = probe_estimate(model, train, probes=64, whiten=False, inverse=inv, seed=seed)
    rel = np.abs(plain.norms() / truth.norms - 1)
    assert np.median(rel) < 0.15  # JL: sd about sqrt(1/(2K)) = 0.09
    white = probe_estimate(model, train, probes=64, whiten=True, inverse=inv, seed=seed)
    err = np.abs(white.self_influence() / truth.self_inf - 1)
    assert np.median(err) < 0.3  # sd about sqrt(2/K) = 0.18
    assert spearmanr(white.self_influence(), truth.self_inf)[0] > 0.9
    assert spearmanr(plain.norms(), truth.norms)[0] > 0.9


@pytest.fixture(scope="module")
def traced():
    """20 training rows and a query (row 20's image against rows 20-25's captions)."""
    part, fi, ft = problem(n=26)
    model = new_model(part, 20, lam=0.05, batch_size=8, seed=3, dtype=torch.float64)
    model = fit_encoder(model, fi[:20], ft[:20], tol=1e-10)
    ref = Reference(model, fi, ft)
    positive = np.array([True, False, False, True, False, False])

    def loss(theta, direction):
        x, y, t = ref.embed(theta, np.arange(20, 26))
        s = t * (y @ x[0] if direction == "image->text" else x @ y[0])
        return -(torch.logsumexp(s[positive], 0) - torch.logsumexp(s, 0))

    h = dense_hessian(ref.objective, model.theta)
    grads = torch.stack(
        [torch.func.grad(lambda th, n=n: ref.removal(th, n))(model.theta) for n in range(20)]
    )
    d = torch.linalg.solve(h, grads.T).T
    train = SimpleNamespace(image=fi[:20], text=ft[:20])
    return model, train, fi, ft, positive, loss, h, d


@pytest.mark.parametrize("direction", ["image->text", "text->image"])
def test_query_gradient_and_relative_influence_equal_dense_autograd(traced, direction):
    model, train, fi, ft, positive, loss, h, d = traced
    if direction == "image->text":
        query, cands = fi[20], ft[20:26]
    else:
        query, cands = ft[20], fi[20:26]
    got_loss = query_loss(model, query, cands, positive, direction=direction)
    assert float(got_loss) == pytest.approx(float(loss(model.theta, direction)), rel=1e-12)
    g = query_gradient(model, query, cands, positive, direction=direction)
    g_ref = torch.func.grad(lambda th: loss(th, direction))(model.theta)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    truth = (d @ g_ref).numpy() / d.norm(dim=1).numpy()  # grad R_n^T H^-1 g / ||H^-1 grad R_n||
    inv = ModelInverse(model, train.image, train.text)
    inv.solve = dense_solve(h)
    p = model.num_params
    exact = relative_influence(
        model, train, g, probes=np.sqrt(p) * torch.eye(p, dtype=torch.float64), inverse=inv
    )
    np.testing.assert_allclose(exact["relative_influence"], truth, rtol=1e-6)
    np.testing.assert_allclose(exact["influence"], (d @ g_ref).numpy() / 20, rtol=1e-6)
    # the defaults: CG and 32 Gaussian probes
    approx = relative_influence(model, train, g)
    assert spearmanr(approx["relative_influence"], truth)[0] > 0.9
