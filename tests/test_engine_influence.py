"""The influence scores against brute force (dense autograd Hessian) and real retraining."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import ecif
from ecif.engine.head import HeadObjective
from tests.engine_reference import Reference, synthetic_pairs

F64 = dict(dtype="float64", newton_steps=3)


def _small(learn_scale=False, n=48, d=4):
    x, y, _ = synthetic_pairs(n, d, noise=0.25, seed=1)
    xv, yv, _ = synthetic_pairs(30, d, noise=0.0, seed=2)
    train, val = ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)
    head = ecif.fit(train, batch_size=8, lam=1e-2, logit_scale=8.0, learn_scale=learn_scale, **F64)
    return train, val, head


@pytest.mark.parametrize("optimizer", ["newton", "lbfgs"])
@pytest.mark.parametrize("learn_scale", [False, True])
def test_fit_reaches_a_stationary_point_of_the_reference_objective(learn_scale, optimizer):
    x, y, _ = synthetic_pairs(48, 4, noise=0.25, seed=1)
    train = ecif.EmbeddingSet(x, y)
    kw = dict(batch_size=8, lam=1e-2, logit_scale=8.0, learn_scale=learn_scale, dtype="float64")
    head = ecif.fit(train, optimizer=optimizer, **kw)
    ref = Reference(head, train.image, train.text)
    g = torch.func.grad(ref.objective)(head.theta())
    assert float(g.abs().max()) < 1e-8
    assert head.info["converged"] and head.info["optimizer"] == optimizer


@pytest.mark.parametrize("learn_scale", [False, True])
def test_hvp_matches_dense_autograd_hessian(learn_scale):
    train, _, head = _small(learn_scale)
    h = Reference(head, train.image, train.text).hessian()
    v = torch.randn(3, head.num_params, dtype=torch.float64)
    hv = HeadObjective(head, train.image, train.text).hvp(head.theta(), v)
    assert torch.allclose(hv, v @ h.T, atol=1e-10 * float(h.abs().max()))
    dense = ecif.solver(head, train, solver="exact").dense()
    assert torch.allclose(dense, h, atol=1e-10 * float(h.abs().max()))


@pytest.mark.parametrize("learn_scale", [False, True])
def test_score_equals_brute_force_formula(learn_scale):
    train, val, head = _small(learn_scale)
    ref = Reference(head, train.image, train.text)
    w = torch.linalg.solve(ref.hessian(), ref.val_grad(val.image, val.text))
    expected = np.array([float(ref.removal_grad(n) @ w) / len(train) for n in range(len(train))])
    for solver in ("exact", "cg"):
        inverse = ecif.solver(head, train, solver=solver, tol=1e-11)
        df = ecif.score(head, train, val, inverse=inverse)
        assert np.allclose(df["influence"], expected, rtol=1e-6, atol=1e-10), solver
        assert np.allclose(df["influence_pos"] + df["influence_neg"], df["influence"], atol=1e-12)
    assert list(df["id"]) == list(train.ids)


def test_self_and_relative_influence_equal_brute_force():
    train, val, head = _small()
    ref = Reference(head, train.image, train.text)
    h = ref.hessian()
    rows = [0, 5, 17, 33]
    grads = torch.stack([ref.removal_grad(n) for n in rows])
    sols = torch.linalg.solve(h, grads.T).T
    si = ecif.self_influence(head, train, rows=rows)
    assert np.allclose(si, (grads * sols).sum(1).numpy(), rtol=1e-8)
    g_test = ref.val_grad(val.image[:5], val.text[:5])
    rel = ecif.relative_influence(head, train, g_test, rows)
    expected = (sols @ g_test / sols.norm(dim=1)).numpy()
    assert np.allclose(rel["relative_influence"], expected, rtol=1e-8)


def test_cg_and_ekfac_solvers_against_exact():
    x, y, _ = synthetic_pairs(400, 12, noise=0.2, seed=3)
    train = ecif.EmbeddingSet(x, y)
    head = ecif.fit(train, batch_size=32, lam=1e-3, logit_scale=10.0, **F64)
    g = torch.randn(4, head.num_params, dtype=torch.float64)
    exact = ecif.solver(head, train, solver="exact").solve(g)
    cg = ecif.solver(head, train, solver="cg", tol=1e-10)
    assert torch.allclose(cg.solve(g), exact, rtol=1e-7, atol=1e-9)
    ek = ecif.solver(head, train, solver="ekfac").solve(g)
    cos = torch.nn.functional.cosine_similarity(ek, exact, dim=1)
    assert float(cos.min()) > 0.9


def test_ekfac_from_a_batch_sample_stays_close_and_cg_stays_exact():
    x, y, _ = synthetic_pairs(2000, 8, noise=0.2, seed=7)
    train = ecif.EmbeddingSet(x, y)
    head = ecif.fit(train, batch_size=16, lam=1e-3, logit_scale=10.0, **F64)  # 125 batches
    g = torch.randn(3, head.num_params, dtype=torch.float64)
    exact = ecif.solver(head, train, solver="exact").solve(g)
    full = ecif.solver(head, train, solver="ekfac", ekfac_batches=None)
    some = ecif.solver(head, train, solver="ekfac", ekfac_batches=32)
    assert full.info["ekfac_batches"] == 125 and some.info["ekfac_batches"] == 32
    a, b = full.solve(g), some.solve(g)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert float(cos.min()) > 0.98 and not torch.allclose(a, b)
    cg = ecif.solver(head, train, solver="cg", tol=1e-10, ekfac_batches=32)
    assert torch.allclose(cg.solve(g), exact, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("learn_scale", [False, True])
def test_cached_hessian_vector_products_equal_recomputed_ones(learn_scale):
    x, y, _ = synthetic_pairs(10_000, 4, noise=0.2, seed=8)  # 157 batches: 2 chunks of <= 128
    train = ecif.EmbeddingSet(x, y)
    kw = dict(batch_size=64, lam=1e-3, logit_scale=10.0, learn_scale=learn_scale, **F64)
    head = ecif.fit(train, **kw)
    theta, v = head.theta(), torch.randn(head.num_params, dtype=torch.float64)
    plain = HeadObjective(head, x, y)
    # bytes of one batch: x and y (64 x 4 each), P and Q (64 x 64 each), S with a learned scale
    per_batch = 64 * 8 * (2 * 4 + 2 * 64 + (64 if learn_scale else 0))
    first_chunk = 128 * per_batch
    for budget in (1 << 30, first_chunk):  # everything cached; the first chunk only
        cached = HeadObjective(head, x, y, cache_bytes=budget)
        want = plain.hvp(theta, v)
        first, again = cached.hvp(theta, v), cached.hvp(theta, v)  # fill, then reuse
        assert cached.cached_batches == (128 if budget == first_chunk else 157)
        assert torch.allclose(first, want, rtol=1e-12) and torch.allclose(again, want, rtol=1e-12)
        moved = theta + 0.01 * torch.randn_like(theta)  # a new theta invalidates the cache
        assert torch.allclose(cached.hvp(moved, v), plain.hvp(moved, v), rtol=1e-12)
    a = ecif.solver(head, train, solver="cg", tol=1e-10, cache_bytes=0).solve(v)
    b = ecif.solver(head, train, solver="cg", tol=1e-10).solve(v)
    assert torch.allclose(a, b, rtol=1e-10)


def test_auto_solver_picks_the_cheaper_method_and_scores_agree():
    # d = 32, B = 64: building the dense Hessian costs ~30x more than a Hessian-vector
    # product per pair, so one solve goes to CG; a solve per pair goes to the dense factor
    x, y, _ = synthetic_pairs(640, 32, noise=0.2, seed=4)
    xv, yv, _ = synthetic_pairs(128, 32, noise=0.0, seed=5)
    train, val = ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)
    head = ecif.fit(train, batch_size=64, lam=1e-3, logit_scale=10.0, **F64)
    auto = ecif.score(head, train, val)
    exact = ecif.score(head, train, val, solver="exact")
    assert auto.attrs["solver"]["method"] == "cg"
    ref = exact["influence"].to_numpy()
    np.testing.assert_allclose(auto["influence"], ref, rtol=0, atol=1e-3 * np.abs(ref).max())
    assert ecif.solver(head, train, solves=len(x)).method == "exact"
    tiny = _small()[2]
    assert ecif.solver(tiny, _small()[0]).method == "exact"


def _retraining_study(
    neg_forms=("exact",), n=240, d=6, singles=40, groups=25, seed=0, default_head=False
):
    x, y, _ = synthetic_pairs(n, d, noise=0.2, seed=5)
    xv, yv, _ = synthetic_pairs(200, d, noise=0.0, seed=6)
    train, val = ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)
    kw = dict(batch_size=24, seed=0, lam=1e-3, logit_scale=10.0, **F64)
    if default_head:  # the scale and pull an audit chooses by default (ecif.audit.selection)
        from ecif.audit.selection import choose_head

        choice = choose_head(train, val, batch_size=24)
        kw.update(lam=choice.lam, logit_scale=choice.logit_scale)
    head = ecif.fit(train, **kw)
    base = head.loss(val)
    scores = {form: ecif.score(head, train, val, neg=form) for form in neg_forms}
    rng = np.random.default_rng(seed)
    rem = rng.choice(n, singles, replace=False)
    actual = np.array([ecif.fit(train, exclude=[r], init=head, **kw).loss(val) - base for r in rem])
    subsets = [rng.choice(n, int(0.05 * n), replace=False) for _ in range(groups)]
    group_actual = np.array(
        [ecif.fit(train, exclude=s, init=head, **kw).loss(val) - base for s in subsets]
    )
    out = {}
    for form, df in scores.items():
        for col in ("influence", "influence_pos"):
            v = df[col].to_numpy()
            out[(form, col)] = (
                spearmanr(v[rem], actual)[0],
                spearmanr([v[s].sum() for s in subsets], group_actual)[0],
            )
    return out


def test_fidelity_against_leave_one_out_and_group_retraining():
    res = _retraining_study(neg_forms=("exact", "first_order"))
    for key, (single, lds) in res.items():
        print(key, f"spearman={single:.3f} lds={lds:.3f}")
    single, lds = res[("exact", "influence")]
    assert single >= 0.9
    assert lds >= 0.7


def test_fidelity_at_the_default_head():
    """Single-removal Spearman >= 0.95 and 5%-subset LDS >= 0.9 with the scale and pull that
    an audit uses by default (not the hand-picked scale 10 above)."""
    (single, lds), *_ = _retraining_study(default_head=True).values()
    print(f"default head: spearman={single:.3f} lds={lds:.3f}")
    assert single >= 0.95
    assert lds >= 0.9


def test_same_seed_same_scores_and_seed_changes_partition():
    x, y, _ = synthetic_pairs(120, 5, seed=7)
    xv, yv, _ = synthetic_pairs(40, 5, noise=0.0, seed=8)
    train, val = ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)
    a = ecif.score(ecif.fit(train, batch_size=16, seed=3), train, val)
    b = ecif.score(ecif.fit(train, batch_size=16, seed=3), train, val)
    assert a.equals(b)
    c = ecif.fit(train, batch_size=16, seed=4)
    assert not np.array_equal(
        c.partition.index, ecif.fit(train, batch_size=16, seed=3).partition.index
    )


def test_bad_inputs_give_clear_errors():
    x, y, _ = synthetic_pairs(20, 4)
    train = ecif.EmbeddingSet(x, y)
    head = ecif.fit(train, batch_size=8)
    wrong = ecif.EmbeddingSet(np.ones((5, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="widths"):
        ecif.score(head, train, wrong)
    with pytest.raises(ValueError, match="validation set"):
        ecif.score(head, train)
    with pytest.raises(ValueError, match="at least 2"):
        ecif.fit(ecif.EmbeddingSet(x[:1], y[:1]))
    with pytest.raises(KeyError, match="not in this set"):
        ecif.fit(train, exclude=[999])
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ecif.EmbeddingSet(bad, y)


def test_negative_breakdown_sums_to_influence_neg():
    from ecif.engine.influence import loss_gradient, negative_breakdown

    train, val, head = _small()
    w = ecif.solver(head, train, solver="exact").solve(loss_gradient(head, val.image, val.text))
    df = ecif.score(head, train, val)
    for row in (0, 9, 30):
        parts = negative_breakdown(head, train.image, train.text, w, row)
        assert len(parts) == 7 and row not in set(parts["row"])
        assert parts["share"].sum() == pytest.approx(df["influence_neg"][row], rel=1e-9, abs=1e-14)


def test_an_exact_hessian_that_fails_its_dtype_is_damped_and_said():
    """Rows of norm 10 at logit scale 100 (unnormalised embeddings): logits of 1e4 leave the
    float32 Hessian indefinite by rounding, though the autograd float64 one is positive
    definite (a convex loss plus lam I). The exact solver must not crash (it did, in a twin
    audit of such rows): it damps, records how much and warns with the remedy; in float64
    the same rows factor undamped and solve as the dense autograd Hessian does."""
    import warnings

    from ecif.engine.inverse_hessian import InverseHessian
    from ecif.grad import dense_hessian

    g = np.random.default_rng(0)
    x = g.standard_normal((60, 8)).astype(np.float32)
    y = x + 0.5 * g.standard_normal((60, 8)).astype(np.float32)
    x = 10 * x / np.linalg.norm(x, axis=1, keepdims=True)
    y = 10 * y / np.linalg.norm(y, axis=1, keepdims=True)
    heads = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unnormalised rows and a short fit: warned elsewhere
        for dtype in ("float32", "float64"):
            heads[dtype] = ecif.fit(
                ecif.EmbeddingSet(x, y), logit_scale=100.0, lam=1e-2, max_iter=20, dtype=dtype
            )
    head = heads["float32"]
    exact = dense_hessian(Reference(head, x, y).objective, head.theta().double())
    assert torch.linalg.eigvalsh(exact)[0] >= 0.99 * head.lam  # PD: the dtype failed, not H
    with pytest.warns(UserWarning, match="not positive definite in float32.*dtype float64"):
        inv = InverseHessian(head, x, y)
    assert inv.info["method"] == "exact" and inv.info["damping"] > 0
    b = torch.as_tensor(g.standard_normal(exact.shape[0]))
    assert torch.isfinite(inv.solve(b.float())).all()
    head = heads["float64"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damping, so no warning
        inv = InverseHessian(head, x, y)
    assert inv.info["damping"] == 0.0
    exact = dense_hessian(Reference(head, x, y).objective, head.theta())
    want = torch.linalg.solve(exact, b)
    assert torch.allclose(inv.solve(b), want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))


def test_a_set_smaller_than_its_batch_is_not_padded_to_the_batch_size():
    """40 pairs in batches of 1,000 used to allocate 1,000 slots a batch (x25 the work); the
    scores must still be the one-batch brute force, and the head keep its nominal size."""
    x, y, _ = synthetic_pairs(24, 4, noise=0.25, seed=3)
    xv, yv, _ = synthetic_pairs(30, 4, noise=0.0, seed=4)
    train, val = ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)
    head = ecif.fit(train, batch_size=1000, lam=1e-2, logit_scale=8.0, **F64)
    assert head.partition.index.shape == (1, 24) and head.batch_size == 1000
    assert sorted(head.partition.index[0]) == list(range(24))
    ref = Reference(head, train.image, train.text)
    w = torch.linalg.solve(ref.hessian(), ref.val_grad(val.image, val.text))
    expected = np.array([float(ref.removal_grad(n) @ w) / len(train) for n in range(len(train))])
    df = ecif.score(head, train, val, inverse=ecif.solver(head, train, solver="cg", tol=1e-11))
    assert np.allclose(df["influence"], expected, rtol=1e-6, atol=1e-10)
    groups = np.array([0] * 10 + [1] * 14)
    part = ecif.engine.batches.make_partition(24, 16, seed=0, groups=groups)
    assert part.index.shape == (2, 14)
    assert sorted(part.index[0][part.index[0] >= 0]) == list(range(10))
    wide = ecif.engine.batches.make_partition(60, 16, seed=0)
    assert wide.index.shape == (4, 16) and (wide.index[-1] == -1).sum() == 4


@pytest.mark.parametrize(
    "n, groups, sizes",
    [
        (257, None, [129, 128]),  # a last batch of 1: no negatives, loss and influence 0
        (600, None, [256, 172, 172]),  # 88 < 128: shares the last full batch's rows
        (2000, None, [256] * 7 + [208]),  # a rest of at least half a batch stays
        (401, [300, 1, 100], [256, 145]),  # 1 + 100 < 128: join the shard before
        (5300, [5000, 300], [256] * 19 + [136, 150, 150]),  # shards alone; 300 = 256 + 44
    ],
)
def test_no_batch_is_smaller_than_half_a_batch(n, groups, sizes):
    from ecif.engine.batches import make_partition

    labels = None if groups is None else np.repeat(np.arange(len(groups)), groups)
    part = make_partition(n, 256, seed=0, groups=labels)
    assert (part.index >= 0).sum(axis=1).tolist() == sizes
    assert sorted(part.members().tolist()) == list(range(n))
    if labels is not None:  # a batch never mixes shards that are large enough alone
        for batch in part.index:
            assert len(set(labels[batch[batch >= 0]])) == 1 or min(groups) < 128
