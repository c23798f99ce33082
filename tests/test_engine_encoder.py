"""The model modes' engine against brute force: an independent float64 implementation of the
objective (plain log_softmax on each batch, slicing theta by hand), autograd for gradients,
dense Hessians and per-pair removal gradients, and real refits for fidelity."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from ecif.engine.encoder_fit import fit_encoder
from ecif.engine.encoder_influence import ModelInverse, score_pass
from ecif.engine.encoder_model import EncoderObjective, loss_gradient, mean_loss, new_model
from ecif.engine.encoder_part import ProjectionPart
from ecif.grad import dense_hessian, jacobian

D_FI, D_FT, D = 12, 10, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch_loss(s):
    return -torch.log_softmax(s, 1).diagonal().sum() - torch.log_softmax(s, 0).diagonal().sum()


def problem(n=22, seed=0, learn_scale=True, bias=True, noise=0.3):
    """Features from a shared latent, with projections that roughly invert the towers' maps
    (a 'pretrained' model the fit moves a little, as fine-tuning does)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    a, b = torch.randn(D, D_FI, **f64), torch.randn(D, D_FT, **f64)
    z = torch.randn(n, D, **f64)
    fi = z @ a + noise * torch.randn(n, D_FI, **f64)
    ft = z @ b + noise * torch.randn(n, D_FT, **f64)
    pi = torch.linalg.pinv(a) + 0.1 * torch.randn(D_FI, D, **f64)
    pt = torch.linalg.pinv(b) + 0.1 * torch.randn(D_FT, D, **f64)
    kw = {}
    if bias:
        kw = dict(image_bias=0.05 * torch.randn(D, **f64), text_bias=0.05 * torch.randn(D, **f64))
    part = ProjectionPart(pi, pt, np.log(5.0), learn_scale=learn_scale, **kw)
    return part, fi, ft


class Reference:
    """J, R_n and the logits from the definitions, without the engine's code paths."""

    def __init__(self, model, fi, ft, learn_scale=True, bias=True):
        self.model, self.fi, self.ft = model, fi, ft
        self.learn_scale, self.bias = learn_scale, bias

    def embed(self, theta, rows):
        k = 0
        pi = theta[k : k + D_FI * D].reshape(D_FI, D)
        k += D_FI * D
        pt = theta[k : k + D_FT * D].reshape(D_FT, D)
        k += D_FT * D
        u, v = self.fi[rows] @ pi, self.ft[rows] @ pt
        if self.bias:
            u, v = u + theta[k : k + D], v + theta[k + D : k + 2 * D]
            k += 2 * D
        t = theta[k].exp() if self.learn_scale else torch.tensor(5.0, dtype=torch.float64)
        return u / u.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True), t

    def logits(self, theta, rows):
        x, y, t = self.embed(theta, rows)
        return t * x @ y.T

    def batches(self):
        return [b[b >= 0] for b in self.model.partition.index]

    def objective(self, theta):
        total = sum(batch_loss(self.logits(theta, b)) for b in self.batches())
        d = theta - self.model.theta0
        return total / self.model.n_norm + 0.5 * self.model.lam * d @ d

    def removal(self, theta, n, part="total"):
        b = next(b for b in self.batches() if n in b)
        rest = b[b != n]
        if part == "pos":
            s = self.logits(theta, b)
            i = int(np.nonzero(b == n)[0][0])
            return -torch.log_softmax(s, 1)[i, i] - torch.log_softmax(s, 0)[i, i]
        return batch_loss(self.logits(theta, b)) - batch_loss(self.logits(theta, rest))


def setup(learn_scale=True, bias=True, lam=0.05):
    part, fi, ft = problem(learn_scale=learn_scale, bias=bias)
    model = new_model(part, len(fi), lam=lam, batch_size=8, seed=3, dtype=torch.float64)
    theta = model.theta0 + 0.05 * torch.randn(
        model.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    model = model.with_theta(theta)
    return model, fi, ft, Reference(model, fi, ft, learn_scale, bias)


@pytest.mark.parametrize("learn_scale,bias", [(True, True), (False, False)])
def test_objective_gradient_and_hessians_equal_autograd(learn_scale, bias):
    model, fi, ft, ref = setup(learn_scale, bias)
    theta = model.theta
    value, grad = EncoderObjective(model, fi, ft).value_and_grad(theta)
    g_ref = torch.func.grad(ref.objective)(theta)
    assert value == pytest.approx(float(ref.objective(theta)), rel=1e-12)
    torch.testing.assert_close(grad, g_ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(2, model.num_params, generator=torch.Generator().manual_seed(5)).double()
    h = dense_hessian(ref.objective, theta)
    exact = EncoderObjective(model, fi, ft, curvature="exact").hvp(theta, v)
    torch.testing.assert_close(exact, v @ h, rtol=1e-9, atol=1e-11)
    # Gauss-Newton: J^T H_S J over each batch's logits, assembled densely
    gn = torch.zeros_like(h)
    for b in ref.batches():
        jac = jacobian(lambda th, b=b: ref.logits(th, b).reshape(-1), theta)
        h_s = dense_hessian(
            lambda s, b=b: batch_loss(s.reshape(len(b), len(b))), ref.logits(theta, b).reshape(-1)
        )
        gn += jac.T @ h_s @ jac
    gn = gn / model.n_norm + model.lam * torch.eye(model.num_params, dtype=torch.float64)
    got = EncoderObjective(model, fi, ft, curvature="gauss_newton").hvp(theta, v)
    torch.testing.assert_close(got, v @ gn, rtol=1e-9, atol=1e-11)
    assert torch.linalg.eigvalsh(gn).min() > 0  # the solver's operator is positive definite


def test_scores_equal_brute_force_removal_gradients():
    model, fi, ft, ref = setup()
    w = torch.randn(model.num_params, generator=torch.Generator().manual_seed(7)).double()
    d_pos, d_neg = score_pass(model, fi, ft, w)
    for n in range(len(fi)):
        total = torch.func.grad(lambda th, n=n: ref.removal(th, n))(model.theta) @ w
        pos = torch.func.grad(lambda th, n=n: ref.removal(th, n, "pos"))(model.theta) @ w
        assert d_pos[n] + d_neg[n] == pytest.approx(float(total), rel=1e-9, abs=1e-11)
        assert d_pos[n] == pytest.approx(float(pos), rel=1e-9, abs=1e-11)


def test_removal_identity_holds_through_the_part():
    """L_b(with n) - L_b(without n) = Pos_n + Neg_n (exact form) at the part's logits."""
    model, fi, ft, ref = setup()
    b = ref.batches()[0]
    s = ref.logits(model.theta, b)
    p, q = torch.softmax(s, 1), torch.softmax(s, 0)
    for i, n in enumerate(b):
        pos = -torch.log(p[i, i]) - torch.log(q[i, i])
        others = [k for k in range(len(b)) if k != i]
        neg = sum(-torch.log1p(-p[k, i]) - torch.log1p(-q[i, k]) for k in others)
        assert float(pos + neg) == pytest.approx(float(ref.removal(model.theta, n)), rel=1e-10)


def test_inverse_solves_the_damped_system():
    model, fi, ft, ref = setup()
    g = loss_gradient(model, fi[:10], ft[:10])
    for curvature, at in (("gauss_newton", model), ("exact", fit_encoder(model, fi, ft))):
        inv = ModelInverse(at, fi, ft, curvature=curvature, damping=0.01, tol=1e-12, max_iter=500)
        w = inv.solve(g)
        obj = EncoderObjective(at, fi, ft, curvature=curvature)
        torch.testing.assert_close(obj.hvp(at.theta, w) + 0.01 * w, g, rtol=1e-8, atol=1e-10)
        assert inv.info["converged"] and inv.info["curvature"] == curvature


def test_fit_reaches_a_stationary_point_of_the_reference_objective():
    part, fi, ft = problem()
    model = fit_encoder(
        new_model(part, len(fi), lam=0.05, batch_size=8, dtype=torch.float64), fi, ft
    )
    assert model.info["converged"]
    g_ref = torch.func.grad(Reference(model, fi, ft).objective)(model.theta)
    assert float(g_ref.abs().max()) < 1e-8


def test_single_removal_scores_track_real_refits():
    """Predicted change of the validation loss against warm-started refits without each pair."""
    part, fi, ft = problem(n=40, seed=2)
    val_part, vfi, vft = problem(n=16, seed=9)
    model = new_model(part, len(fi), lam=0.05, batch_size=8, seed=1, dtype=torch.float64)
    model = fit_encoder(model, fi, ft, tol=1e-11)
    w = ModelInverse(model, fi, ft, tol=1e-10).solve(loss_gradient(model, vfi, vft))
    d_pos, d_neg = score_pass(model, fi, ft, w)
    predicted = (d_pos + d_neg) / model.n_norm
    base = mean_loss(model, vfi, vft)
    actual = []
    for n in range(len(fi)):
        refit = fit_encoder(model, fi, ft, init=model, exclude_positions=np.array([n]), tol=1e-11)
        actual.append(mean_loss(refit, vfi, vft) - base)
    assert refit.info["converged"]
    rho = spearmanr(predicted, actual).statistic
    assert rho > 0.95, rho  # measured 0.967 (one removal of 40 moves the loss a lot here:
    assert pearsonr(predicted, actual).statistic > 0.9  # first order under-reads the largest)


@pytest.mark.parametrize("learn_scale,bias,floor", [(True, True, 0.3), (False, False, 0.0)])
def test_closed_form_embedding_tangents_equal_torch_func_jvp(learn_scale, bias, floor):
    part, fi, ft = problem(learn_scale=learn_scale, bias=bias)
    part.floors = (floor, 2 * floor)
    theta = part.initial() + 0.1 * torch.randn(
        part.layout.numel, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    w = torch.randn(part.layout.numel, generator=torch.Generator().manual_seed(4)).double()
    got = part.embed_jvp(theta, w, fi, ft)
    ref = torch.func.jvp(lambda th: part.embed(th, fi, ft), (theta,), (w,))
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
