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
from ecif.grad import dense_hessian
from tests.test_engine_encoder import Reference, problem

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    inv.solve = lambda g: torch.linalg.solve(h, g)
    return model, SimpleNamespace(image=fi, text=ft), inv, truth


def test_probes_use_the_model_inverse_by_default(fitted):
    model, train, inv, truth = fitted
    est = probe_estimate(model, train, probes=2, whiten=True, seed=4)
    dense = probe_estimate(model, train, probes=2, whiten=True, inverse=inv, seed=4)
    np.testing.assert_allclose(est.through, dense.through, rtol=1e-3, atol=1e-6)


def test_basis_probes_give_the_exact_norms_and_self_influence(fitted):
    model, train, inv, truth = fitted
    p = model.num_params
    basis = np.sqrt(p) * torch.eye(p, dtype=torch.float64)  # mean over K = P probes is exact
    plain = probe_estimate(model, train, probes=basis, whiten=False, inverse=inv)
    np.testing.assert_allclose(plain.norms(), truth.norms, rtol=1e-6)
    np.testing.assert_allclose(plain.self_influence(), truth.self_inf, rtol=1e-6)
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
