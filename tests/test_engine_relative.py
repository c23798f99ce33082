"""Per-pair norms ||H^-1 grad R_n|| and the candidate numerator against brute force."""

import numpy as np
import pytest
import torch

import ecif
from ecif.engine.contrastive import batch_stats, removal_directional, removal_weights
from ecif.engine.inverse_hessian import InverseHessian, SolverArgs
from ecif.engine.relative import (
    candidate_pass,
    exact_norms,
    low_rank,
    probe_norms,
    removal_terms,
)
from tests.engine_reference import Reference, removal_directional_reference, synthetic_pairs

F64 = dict(dtype="float64", newton_steps=3)


def _head(n=45, d=4, learn_scale=False, batch_size=8):
    # 45 = 5 full batches + one of 5: the partial batch's mask is exercised
    x, y, _ = synthetic_pairs(n, d, noise=0.25, seed=1)
    xv, yv, _ = synthetic_pairs(30, d, noise=0.0, seed=2)
    train, val = ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)
    head = ecif.fit(
        train, batch_size=batch_size, lam=1e-2, logit_scale=8.0, learn_scale=learn_scale, **F64
    )
    return train, val, head


@pytest.mark.parametrize("learn_scale", [False, True])
def test_exact_norms_equal_brute_force(learn_scale):
    train, _, head = _head(learn_scale=learn_scale)
    ref = Reference(head, train.image, train.text)
    grads = torch.stack([ref.removal_grad(n) for n in range(len(train))])
    expected = torch.linalg.solve(ref.hessian(), grads.T).T.norm(dim=1).numpy()
    inv = InverseHessian(head, train.image, train.text, SolverArgs(solver="exact"))
    got = exact_norms(head, train.image, train.text, inv)
    assert np.allclose(got, expected, rtol=1e-8)


def test_many_directions_equal_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    s = 3 * torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    ds = torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    s[2, 4:], s[2, :, 4:] = 0.0, 0.0  # missing members have zero embeddings
    ds[:, 2, 4:], ds[:, 2, :, 4:] = 0.0, 0.0
    for neg in ("exact", "first_order"):
        many = removal_directional(s, ds, mask, neg).total  # (K, c, B): softmaxes once
        st = batch_stats(s, mask)
        for k in range(5):
            pos, ng = removal_directional_reference(st, removal_weights(s, st, neg), ds[k])
            assert torch.allclose(many[k], pos + ng, atol=1e-12), neg


@pytest.mark.parametrize("neg", ["exact", "first_order"])
def test_selected_members_equal_the_full_batch_terms(neg):
    g = torch.Generator().manual_seed(3)
    s = 4 * torch.randn(3, 7, 7, generator=g, dtype=torch.float64)
    s[0, 2, 5] = 60.0  # a confident wrong match: 1 - p needs the direct sum (no cancellation)
    s[1, 4, 1] = 60.0
    ds = torch.randn(3, 7, 7, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 5:] = False
    s[2, 5:], s[2, :, 5:], ds[2, 5:], ds[2, :, 5:] = 0.0, 0.0, 0.0, 0.0
    ci = np.array([0, 0, 1, 1, 2, 2, 2])
    ni = np.array([5, 2, 1, 4, 0, 4, 3])
    got = removal_directional(s, ds, mask, neg, at=(ci, ni)).total
    st = batch_stats(s, mask)
    pos, ng = removal_directional_reference(st, removal_weights(s, st, neg), ds)
    assert torch.allclose(got, (pos + ng)[ci, ni], rtol=1e-10, atol=1e-12)
    want = removal_terms(s, ds, mask, neg)["dot"][ci, ni]  # the norms pass's full form
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_probe_norms_estimate_exact_norms():
    train, _, head = _head()
    inv = InverseHessian(head, train.image, train.text, SolverArgs(solver="exact"))
    exact = exact_norms(head, train.image, train.text, inv)
    est = probe_norms(head, train.image, train.text, inv, probes=3000, seed=1)
    ratio = est / exact
    # relative standard error 1/sqrt(2K) = 1.3 %: a 6 % band is > 4 sigma per pair
    assert np.abs(ratio - 1).max() < 0.06
    assert abs(ratio.mean() - 1) < 0.01
    few = probe_norms(head, train.image, train.text, inv, probes=8, seed=1)
    assert np.abs(few / exact - 1).max() > 0.06  # the estimate really is a noisy one


def test_low_rank_w_and_precomputed_norms_match_the_full_path():
    train, val, head = _head(n=200, d=32, batch_size=16)
    ref = Reference(head, train.image, train.text)
    g_test = ref.val_grad(val.image[:5], val.text[:5])
    rows = np.arange(len(train))  # every batch, the short one (200 = 12 x 16 + 8) included
    full = ecif.relative_influence(head, train, g_test, rows)
    inv = InverseHessian(head, train.image, train.text, SolverArgs(solver="exact"))
    norms = exact_norms(head, train.image, train.text, inv)
    fast = ecif.relative_influence(head, train, g_test, rows, inverse=inv, norms=norms, rank_tol=0)
    assert np.allclose(fast["relative_influence"], full["relative_influence"], rtol=1e-7)
    assert fast.attrs["norm"] == "precomputed"
    # a truncated W (EK-FAC's, as traces at scale use): the dot products move by at most
    # ||grad R_n|| * ||W - W_r||
    w = InverseHessian(head, train.image, train.text, SolverArgs(solver="ekfac")).solve(g_test)
    wm = w.reshape(32, 32)
    lr = low_rank(wm, 0.05)
    assert lr is not None
    gap = float((wm - lr[0] @ lr[1].T).norm())
    assert 0 < gap <= 0.05 * float(wm.norm())
    sel = rows[::7]
    dot_lr, _ = candidate_pass(head, train.image, train.text, w, sel, rank_tol=0.05)
    dot_full, _ = candidate_pass(head, train.image, train.text, w, sel)
    gnorm = torch.stack([ref.removal_grad(int(n)) for n in sel]).norm(dim=1).numpy()
    assert np.all(np.abs(dot_lr - dot_full) <= gnorm * gap + 1e-12)
    assert not np.allclose(dot_lr, dot_full, rtol=1e-12, atol=0)  # it was truncated
    with pytest.raises(ValueError, match="norms has"):
        ecif.relative_influence(head, train, g_test, rows, norms=norms[:-1])


def test_low_rank_finds_an_exact_low_rank_matrix_and_refuses_a_full_one():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 3, generator=g, dtype=torch.float64) for _ in range(2))
    wm = a @ b.T
    left, right = low_rank(wm, 1e-6)
    assert torch.allclose(left @ right.T, wm, atol=1e-10)
    assert low_rank(torch.randn(64, 64, generator=g, dtype=torch.float64), 1e-3) is None
    assert low_rank(wm, 0.0) is None  # tol 0: use the full W


@pytest.mark.parametrize("learn_scale", [False, True])
@pytest.mark.parametrize("neg", ["exact", "first_order"])
def test_context_dots_equal_the_batch_pass_and_respect_their_bound(learn_scale, neg):
    from ecif.engine.batch_context import context_dots, fill_context, new_context

    train, val, head = _head(n=45, d=4, learn_scale=learn_scale)  # a short last batch
    x, y = train.image, train.text
    ctx = fill_context(head, x, y, new_context(len(train), 4, 4, vector_dtype=np.float64))
    g = torch.Generator().manual_seed(5)
    w = torch.randn(head.num_params, generator=g, dtype=torch.float64)
    rows = np.arange(len(train))
    want, _ = candidate_pass(head, x, y, w, rows, neg=neg)
    got, bound = context_dots(head, x, y, ctx, w, rows, top=8, neg=neg, chunk=7)
    assert np.allclose(got, want, rtol=1e-9, atol=1e-12)
    assert np.all(bound <= 1e-12)  # top = batch size drops nothing
    cut, bound = context_dots(head, x, y, ctx, w, rows, top=2, neg=neg)
    assert np.all(np.abs(cut - want) <= bound + 1e-12)
    assert np.abs(cut - want).max() > 1e-6  # the cut is real


@pytest.mark.parametrize("neg", ["exact", "first_order"])
def test_context_norms_equal_the_batch_pass_ekfac_norms_and_respect_their_bound(neg):
    from ecif.engine.batch_context import context_norms, fill_context, new_context

    train, val, head = _head(n=45, d=4, learn_scale=False)  # a short last batch
    x, y = train.image, train.text
    ctx = fill_context(head, x, y, new_context(len(train), 4, 4, vector_dtype=np.float64))
    inv = InverseHessian(head, x, y, SolverArgs(solver="ekfac"))
    rows = np.arange(len(train))
    _, want = candidate_pass(head, x, y, None, rows, neg=neg, inverse=inv)
    got, bound = context_norms(head, x, y, ctx, inv.ekfac, rows, top=8, neg=neg, chunk=7)
    assert np.allclose(got, want, rtol=1e-10)
    assert np.all(bound <= 1e-12)  # every member kept: nothing dropped
    cut, bound = context_norms(head, x, y, ctx, inv.ekfac, rows, top=1, neg=neg)
    assert np.all(np.abs(cut - want) <= bound + 1e-12)
    assert np.abs(cut - want).max() > 1e-6  # the cut is real
    g = torch.randn(
        head.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    kw = dict(neg=neg, inverse=inv)
    fast = ecif.relative_influence(head, train, g, rows, context=ctx, context_top=8, **kw)
    slow = ecif.relative_influence(head, train, g, rows, **kw)
    assert fast.attrs["norm"] == slow.attrs["norm"] == "ekfac" and fast.attrs["max_bound"] < 1e-12
    assert np.allclose(fast["relative_influence"], slow["relative_influence"], rtol=1e-9)


def test_float16_context_on_a_float32_head_stays_close_to_the_batch_pass():
    from ecif.engine.batch_context import context_dots, context_norms, fill_context, new_context

    x, y, _ = synthetic_pairs(600, 8, noise=0.2, seed=4)
    x, y = x.astype(np.float16), y.astype(np.float16)  # as clip-retrieval stores them
    head = ecif.fit((x, y), batch_size=32, lam=1e-3, logit_scale=30.0)  # float32 head
    ctx = fill_context(head, x, y, new_context(600, 8, 8, vector_dtype=np.float16))
    inv = InverseHessian(head, x, y, SolverArgs(solver="ekfac"))
    w = inv.solve(torch.randn(head.num_params, generator=torch.Generator().manual_seed(1)))
    rows = np.arange(0, 600, 7)
    want_dot, want_norm = candidate_pass(head, x, y, w, rows, inverse=inv)
    dot, bound = context_dots(head, x, y, ctx, w, rows)
    norm, _ = context_norms(head, x, y, ctx, inv.ekfac, rows)
    assert bound.max() < 1e-6  # 31 others per batch, 32 kept: nothing dropped
    assert np.abs(dot - want_dot).max() < 3e-3 * np.abs(want_dot).max()  # measured 2e-4
    assert np.abs(norm / want_norm - 1).max() < 3e-3  # measured 4e-4: float16 partners
