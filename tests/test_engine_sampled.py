"""Curvature from a batch sample: the fit and the solve reach the full problem's answers
(dense Newton, dense solve), with fewer full passes, counted."""

from dataclasses import replace

import pytest
import torch

import ecif
from ecif.datasets import clip_like_pairs
from ecif.engine.batches import make_partition
from ecif.engine.row_sums import LocalRows
from ecif.grad.solvers import conjugate_gradient

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_flexible_cg_converges_with_a_preconditioner_that_changes():
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.logspace(0, 4, 60, dtype=torch.float64)) @ q.T
    b = torch.randn(60, generator=g, dtype=torch.float64)

    def rough_inverse(r):  # an inner solve to 1e-2 from a random start: another map each call
        x0 = 0.1 * torch.randn(60, generator=g, dtype=torch.float64) * r.norm()
        return conjugate_gradient(lambda v: a @ v, r, x0=x0, tol=1e-2).x

    res = conjugate_gradient(lambda v: a @ v, b, precond=rough_inverse, tol=1e-10, flexible=True)
    assert res.converged and res.iterations < 40
    assert torch.allclose(res.x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-12)


@pytest.fixture(scope="module")
def problem():
    x, y, _ = clip_like_pairs(16000, 8, seed=3)  # 500 batches of 32
    xv, yv, _ = clip_like_pairs(500, 8, seed=3, rows_seed=1)
    return ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)


KW = dict(batch_size=32, logit_scale=30.0, lam=1e-3, dtype="float64", tol=1e-9)


def test_fit_on_a_sample_reaches_the_full_optimum_in_fewer_passes(problem):
    train, _ = problem
    newton = ecif.fit(train, optimizer="newton", **KW)  # dense Hessian: the reference optimum
    plain = ecif.fit(train, optimizer="lbfgs", sample_batches=0, warmup_epochs=0, **KW)
    rows = LocalRows(train.image, train.text)
    # 32 batches: 16 pairs a parameter (64 parameters)
    sampled = ecif.fit(train, optimizer="lbfgs", sample_batches=32, rows=rows, **KW)
    assert sampled.info["converged"] and sampled.info["sample_batches"] == 32
    scale = float(newton.m.abs().max())
    assert float((sampled.m - newton.m).abs().max()) / scale < 1e-7
    assert float((plain.m - newton.m).abs().max()) / scale < 1e-7
    # every batch computed, the sample's included, is counted: 500 batches a pass
    assert sampled.info["passes"] == pytest.approx(rows.count.computed / 500)
    assert sampled.info["passes"] < 0.8 * plain.info["passes"]  # measured 30.4 vs 48


def test_sample_preconditioned_solve_equals_the_dense_solve(problem):
    train, val = problem
    head = ecif.fit(train, optimizer="newton", **KW)
    g = ecif.loss_gradient(head, val)
    exact = ecif.solver(head, train, solver="exact").solve(g)
    plain = ecif.solver(head, train, solver="cg", tol=1e-10, sample_batches=0)
    sampled = ecif.solver(head, train, solver="cg", tol=1e-10, sample_batches=32)
    plain.solve(g)
    w1 = sampled.solve(g)
    assert sampled.info["sample_batches"] == 32 and "sample_batches" not in plain.info
    assert torch.allclose(w1, exact, rtol=1e-7, atol=1e-10 * float(exact.abs().max()))
    assert sampled.info["cg_iterations"] < plain.info["cg_iterations"]
    both = torch.stack([g, 2 * g])  # several right-hand sides at once
    assert torch.allclose(sampled.solve(both)[1], 2 * exact, rtol=1e-7, atol=1e-9)


def test_auto_samples_only_where_the_sample_is_large_and_a_small_share(problem):
    from ecif.engine.inverse_hessian import sample_size

    train, _ = problem
    head = ecif.fit(train, optimizer="lbfgs", **KW)  # 500 batches: auto leaves it off
    assert head.info["sample_batches"] == 0
    assert head.info["passes"] == head.info["evaluations"]

    def at(n, d, b=256):
        return replace(head, m=torch.zeros(d, d), partition=make_partition(n, b))

    # d = 64: 256 batches hold 16 pairs a parameter; on from 4 x 256 batches
    assert sample_size(None, at(256 * 1023, 64)) == 0
    assert sample_size(None, at(256 * 1024, 64)) == 256
    # d = 128: 8 pairs a parameter need 512 batches, so from 2,048 batches (524k pairs)
    assert sample_size(None, at(1_000_000, 128)) == 512
    assert sample_size(None, at(500_000, 128)) == 0
    assert sample_size(None, at(1_000_000, 512)) == 0  # 8,192 batches: a 34M-pair set
    assert sample_size(50, at(256 * 40, 8)) == 0 and sample_size(12, at(256 * 40, 8)) == 12


def test_inner_solve_spends_at_most_one_pass_of_sample_products(problem):
    from ecif.engine import inverse_hessian as ih
    from ecif.engine.head import HeadObjective

    train, _ = problem
    head = ecif.fit(train, optimizer="newton", **KW)
    obj = HeadObjective(head, train.image, train.text)
    # 500 batches: a product on 32 of them is 32/500 of a pass, so 16 make one pass
    assert ih.inner_budget(ih.sample_objective(obj, 32, 1, 0)) == 16
    assert ih.inner_budget(ih.sample_objective(obj, 125, 1, 0)) == 4
    assert ih.inner_budget(ih.sample_objective(obj, 2, 1, 0)) == ih.INNER_MAX_ITER  # 250 > 100
    assert ih.inner_budget(obj) == ih.INNER_MAX_ITER  # not a sample


def test_sample_fit_that_hands_over_early_reaches_the_full_optimum(problem, monkeypatch):
    """Where L-BFGS slows down on the sample, Newton steps on all pairs take over at once
    (no Newton-CG on the sample): still the dense Newton optimum, in fewer passes."""
    from ecif.engine import fit as fit_mod

    train, _ = problem
    kw = {**KW, "logit_scale": 100.0}  # ill-conditioned: L-BFGS slows down
    newton = ecif.fit(train, optimizer="newton", **kw)
    seen = []
    lbfgs = fit_mod._lbfgs

    def spy(obj, start, args, tol, finish=True):
        out = lbfgs(obj, start, args, tol, finish)
        seen.append((obj.batch_ids is not None, finish, out[-1]))
        return out

    monkeypatch.setattr(fit_mod, "_lbfgs", spy)
    monkeypatch.setattr(fit_mod, "HANDOVER_PASSES", 5)  # hand over early, far from the optimum
    sampled = ecif.fit(train, optimizer="lbfgs", sample_batches=32, **kw)
    assert seen[0] == (True, False, "handover")
    assert sampled.info["converged"]
    scale = float(newton.m.abs().max())
    assert float((sampled.m - newton.m).abs().max()) / scale < 1e-7
