"""Closed-form removal terms and their derivatives against autograd and brute force (float64)."""

import pytest
import torch

from ecif.engine.contrastive import (
    batch_stats,
    loss_grad_logits,
    loss_hessian_logits,
    removal_directional,
    removal_grad_logits,
    removal_weights,
)
from tests.engine_reference import removal_directional_reference, removal_values

B = 7


def _batch(seed=0, masked=(5,), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(1, B, B, generator=g, dtype=torch.float64)
    mask = torch.ones(1, B, dtype=torch.bool)
    for k in masked:
        mask[0, k] = False
    return s, mask


def _members(mask):
    return [i for i in range(B) if mask[0, i]]


def _loss_direct(s, members):
    """Symmetric InfoNCE of the sub-batch ``members``, written independently."""
    sub = s[0][members][:, members]
    return -torch.log_softmax(sub, 1).diagonal().sum() - torch.log_softmax(sub, 0).diagonal().sum()


def _pos_direct(s, members, n):
    sub = s[0][members][:, members]
    i = members.index(n)
    return -torch.log_softmax(sub, 1)[i, i] - torch.log_softmax(sub, 0)[i, i]


def _neg_direct(s, members, n, form):
    sub = s[0][members][:, members]
    i = members.index(n)
    p, q = torch.softmax(sub, 1), torch.softmax(sub, 0)
    ks = [k for k in range(len(members)) if k != i]
    if form == "exact":
        return sum(-torch.log1p(-p[k, i]) - torch.log1p(-q[i, k]) for k in ks)
    return sum(p[k, i] + q[i, k] for k in ks)


def test_removal_identity_exact_neg_equals_loss_drop():
    """L_b(with n) - L_b(without n) = Pos_n + Neg_n exactly, for the exact Neg."""
    s, mask = _batch()
    st = batch_stats(s, mask)
    pos, neg = removal_values(st, removal_weights(s, st, "exact"))
    members = _members(mask)
    full = _loss_direct(s, members)
    for n in members:
        without = _loss_direct(s, [m for m in members if m != n])
        assert float(pos[0, n] + neg[0, n]) == pytest.approx(float(full - without), rel=1e-12)
    assert float(pos[0, 5]) == 0.0 and float(neg[0, 5]) == 0.0


@pytest.mark.parametrize("form", ["exact", "first_order"])
def test_removal_values_and_gradients_match_autograd(form):
    s, mask = _batch(seed=1)
    members = _members(mask)
    st = batch_stats(s, mask)
    w = removal_weights(s, st, form)
    pos, neg = removal_values(st, w)
    ds = torch.randn(1, B, B, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    d_pos, d_neg = removal_directional_reference(st, w, ds)
    lib = removal_directional(s, ds, mask, form)  # the library's one implementation
    g_pos, g_neg = removal_grad_logits(st, w, torch.tensor(members))
    for k, n in enumerate(members):
        sv = s.clone().requires_grad_(True)
        pv = _pos_direct(sv, members, n)
        nv = _neg_direct(sv, members, n, form)
        assert float(pos[0, n]) == pytest.approx(pv.item(), rel=1e-12)
        assert float(neg[0, n]) == pytest.approx(nv.item(), rel=1e-12)
        gp = torch.autograd.grad(pv, sv, retain_graph=True)[0]
        gn = torch.autograd.grad(nv, sv)[0]
        assert torch.allclose(g_pos[k], gp[0], atol=1e-12)
        assert torch.allclose(g_neg[k], gn[0], atol=1e-12)
        assert float(d_pos[0, n]) == pytest.approx(float((gp * ds).sum()), rel=1e-10, abs=1e-12)
        assert float(d_neg[0, n]) == pytest.approx(float((gn * ds).sum()), rel=1e-10, abs=1e-12)
        assert float(lib.pos[0, n]) == pytest.approx(float((gp * ds).sum()), rel=1e-10, abs=1e-12)
        assert float(lib.neg[0, n]) == pytest.approx(float((gn * ds).sum()), rel=1e-10, abs=1e-12)


def test_loss_gradient_and_hessian_of_logits_match_autograd():
    s, mask = _batch(seed=2)
    members = _members(mask)
    st = batch_stats(s, mask)
    sv = s.clone().requires_grad_(True)
    g_auto = torch.autograd.grad(_loss_direct(sv, members), sv)[0]
    assert torch.allclose(loss_grad_logits(st), g_auto, atol=1e-12)
    ds = torch.randn(1, B, B, dtype=torch.float64)

    def grad_fn(x):
        return torch.func.grad(lambda z: _loss_direct(z, members))(x)

    hv = torch.func.jvp(grad_fn, (s,), (ds,))[1]
    assert torch.allclose(loss_hessian_logits(st, ds), hv, atol=1e-11)


def _neg_by_logsumexp(s, n):
    """Exact Neg_n from its definition: log-normalisers with and without member n."""
    b = s.shape[-1]
    keep = [j for j in range(b) if j != n]
    total = 0.0
    for k in keep:
        total += torch.logsumexp(s[k], 0) - torch.logsumexp(s[k, keep], 0)
        total += torch.logsumexp(s[:, k], 0) - torch.logsumexp(s[keep, k], 0)
    return float(total)


def test_exact_neg_is_stable_when_a_probability_rounds_to_one():
    """An off-diagonal entry dominating its row: naive 1 - p is 0 in float32, -log gives inf."""
    s = torch.zeros(1, 4, 4, dtype=torch.float32)
    s[0, 0, 1] = 40.0  # p_01 = 1 - 3e-17
    s[0, 2, 3] = 25.0
    mask = torch.ones(1, 4, dtype=torch.bool)
    st = batch_stats(s, mask)
    _, neg = removal_values(st, removal_weights(s, st, "exact"))
    naive = -torch.log1p(-torch.softmax(s[0], 1)[0, 1])
    assert not torch.isfinite(naive)  # the failure this guards against
    for n in range(4):
        assert float(neg[0, n]) == pytest.approx(_neg_by_logsumexp(s[0].double(), n), rel=1e-5)


@pytest.mark.parametrize("form", ["exact", "first_order"])
@pytest.mark.parametrize("masked", [(), (2, 5)])
def test_fast_scoring_path_equals_reference_terms(form, masked):
    g = torch.Generator().manual_seed(4)
    s = 6.0 * torch.randn(3, B, B, generator=g, dtype=torch.float64)
    s[1, 0, 3] = 80.0  # one nearly certain off-diagonal entry
    ds = torch.randn(3, B, B, generator=g, dtype=torch.float64)
    mask = torch.ones(3, B, dtype=torch.bool)
    for k in masked:
        mask[0, k] = False
    st = batch_stats(s, mask)
    ref_pos, ref_neg = removal_directional_reference(st, removal_weights(s, st, form), ds)
    fast = removal_directional(s, ds, mask, form)
    assert torch.allclose(fast.pos, ref_pos, atol=1e-12)
    assert torch.allclose(fast.neg, ref_neg, atol=1e-10)
    # selected members only (the trace-back form): the same values, member by member
    ci, ni = torch.nonzero(mask, as_tuple=True)
    some = removal_directional(s, ds, mask, form, at=(ci, ni))
    assert torch.allclose(some.pos, ref_pos[ci, ni], atol=1e-12)
    assert torch.allclose(some.neg, ref_neg[ci, ni], atol=1e-10)
