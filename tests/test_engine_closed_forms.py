"""The head's closed forms against the generic torch.func forms of ``ecif.grad`` applied to
the independent reference objective (tests/engine_reference.py), float64."""

import numpy as np
import pytest
import torch

import ecif
from ecif.engine.head import HeadObjective
from ecif.engine.influence import classification_gradient, loss_gradient, pair_gradients
from ecif.grad import dense_direction, hvp, newton, value_and_grad
from tests.engine_reference import Reference, synthetic_pairs


def _problem(learn_scale):
    x, y, _ = synthetic_pairs(45, 4, noise=0.25, seed=1)  # a short last batch (45 = 5 x 8 + 5)
    train = ecif.EmbeddingSet(x, y)
    head = ecif.fit(
        train, batch_size=8, lam=1e-2, logit_scale=8.0, learn_scale=learn_scale, dtype="float64"
    )
    return train, head, Reference(head, x, y)


@pytest.mark.parametrize("learn_scale", [False, True])
def test_value_gradient_and_hvps_equal_autodiff_of_the_reference(learn_scale):
    train, head, ref = _problem(learn_scale)
    obj = HeadObjective(head, train.image, train.text)
    g = torch.Generator().manual_seed(0)
    theta = head.theta() + 0.1 * torch.randn(head.num_params, generator=g, dtype=torch.float64)
    value, grad = obj.value_and_grad(theta)
    want_value, want_grad = ref.as_objective().value_and_grad(theta)
    assert value == pytest.approx(want_value, rel=1e-12)
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-13)
    v = torch.randn(3, head.num_params, generator=g, dtype=torch.float64)
    want = hvp(ref.objective, theta, v)  # three vectors at once (vmap)
    assert torch.allclose(obj.hvp(theta, v), want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(obj.hvp(theta, v[0]), want[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("learn_scale", [False, True])
def test_pair_gradients_equal_the_jacobian_of_the_reference_removal_terms(learn_scale):
    train, head, ref = _problem(learn_scale)
    rows = np.array([0, 7, 20, 44])  # 44 sits in the short batch
    g_pos, g_neg = pair_gradients(head, train.image, train.text, rows)
    want = ref.removal_grads(rows)
    assert torch.allclose(g_pos + g_neg, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("learn_scale", [False, True])
def test_query_gradients_equal_autodiff(learn_scale):
    train, head, ref = _problem(learn_scale)
    xv, yv, _ = synthetic_pairs(20, 4, noise=0.0, seed=2)
    theta = head.theta()
    assert torch.allclose(loss_gradient(head, xv, yv), ref.val_grad(xv, yv), rtol=1e-10, atol=1e-13)
    image, texts = torch.as_tensor(xv[0]), torch.as_tensor(yv[:5])

    def ce(th):  # cross-entropy of the image against five captions, the third one correct
        t = th[-1].exp() if learn_scale else torch.tensor(head.logit_scale, dtype=th.dtype)
        return -torch.log_softmax(t * image @ th[:16].reshape(4, 4) @ texts.T, 0)[2]

    want = value_and_grad(ce, theta)[1]
    got = classification_gradient(head, xv[0], yv[:5], 2)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


def test_shared_newton_on_the_reference_objective_reaches_the_fitted_head():
    """ecif.grad.newton with dense autodiff Hessians of the reference J lands on the head the
    engine's closed forms fit: the loop is shared, not tied to the head."""
    train, head, ref = _problem(False)
    obj = ref.as_objective()
    start = head.m0.reshape(-1).clone()
    theta, _, grad, iterations, _, stop = newton(obj, start, dense_direction(obj), 1e-10, 50)
    assert stop == "tol" and iterations > 1 and float(grad.abs().max()) <= 1e-10
    assert torch.allclose(theta, head.theta(), rtol=0, atol=1e-8)
