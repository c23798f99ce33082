"""Every pass over the pairs, block by block: against autograd locally, and bitwise the same on
a Dask LocalCluster (127.0.0.1) with 1 or 2 workers, through a worker killed mid-pass."""

import sys
import time

import cloudpickle
import numpy as np
import pytest
import torch
from dask.distributed import Client, LocalCluster

import ecif
from ecif.distributed import open_client
from ecif.engine import row_sums
from ecif.engine.head import HeadObjective, value_grad_terms
from ecif.engine.row_sums import Pass
from tests.dask_kill import killing_one_busy_worker
from tests.engine_reference import Reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = dict(dtype="float64")
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the slow kernel, to the workers


def _pairs(n=3000, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x + 0.4 * rng.standard_normal((n, d)).astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x, y


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 batches: a pass sums many blocks."""
    monkeypatch.setattr(row_sums, "BLOCK_BATCHES", 4)


@pytest.fixture(scope="module")
def client():
    cluster = LocalCluster(
        host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.mark.parametrize("learn_scale", [False, True])
def test_block_sums_equal_autograd(small_blocks, learn_scale):
    x, y = _pairs(600, 4)
    train = ecif.EmbeddingSet(x, y)
    head = ecif.fit(
        train, batch_size=16, logit_scale=5.0, learn_scale=learn_scale, max_iter=3, **F64
    )
    assert len(row_sums.blocks_of(head.partition)) == 10  # 38 batches in blocks of 4
    ref = Reference(head, x, y)
    theta = head.theta() + 0.01 * torch.randn(head.num_params, dtype=torch.float64)
    obj = HeadObjective(head, x, y)
    value, grad = obj.value_and_grad(theta)
    assert value == pytest.approx(float(ref.objective(theta)), rel=1e-12)
    want = torch.func.grad(ref.objective)(theta)
    assert torch.allclose(grad, want, rtol=1e-10, atol=1e-13)
    v = torch.randn(2, head.num_params, dtype=torch.float64)
    hv = torch.stack([torch.func.jvp(torch.func.grad(ref.objective), (theta,), (r,))[1] for r in v])
    assert torch.allclose(obj.hvp(theta, v), hv, rtol=1e-9, atol=1e-12)
    dense = torch.func.hessian(ref.objective)(theta)
    assert torch.allclose(obj.dense_hessian(theta), dense, rtol=1e-9, atol=1e-12)


def test_subsampled_passes_take_only_their_batches(small_blocks):
    x, y = _pairs(600, 4)
    head = ecif.fit(ecif.EmbeddingSet(x, y), batch_size=16, logit_scale=5.0, max_iter=2, **F64)
    ids = np.array([1, 2, 9, 17, 30])
    assert [k for k, _ in row_sums.blocks_of(head.partition, ids)] == [0, 2, 4, 7]
    sub = HeadObjective(head, x, y, batch_ids=ids).value_and_grad(head.theta())[1]
    rows = head.partition.index[ids]
    kept = head.partition.without(np.setdiff1d(np.arange(600), rows[rows >= 0]))
    from dataclasses import replace

    only = replace(head, partition=kept)
    assert torch.allclose(sub, HeadObjective(only, x, y).value_and_grad(only.theta())[1])
    with pytest.raises(ValueError, match="sorted"):
        row_sums.blocks_of(head.partition, ids[::-1])


def _local_and_cluster(client, x, y, val, **kw):
    train = ecif.EmbeddingSet(x, y)
    local_head = ecif.fit(train, **kw)
    rows = ecif.ClusterRows(client, x, y)
    cluster_head = ecif.fit(train, rows=rows, **kw)
    return train, local_head, cluster_head, rows


@pytest.mark.parametrize("solver", ["cg", "ekfac", "exact"])
def test_cluster_fit_solve_and_score_are_bitwise_local(client, small_blocks, solver):
    x, y = _pairs(3000, 6)
    val = ecif.EmbeddingSet(*_pairs(300, 6, seed=1))
    kw = dict(batch_size=32, logit_scale=10.0, lam=1e-3, optimizer="lbfgs")
    train, local, cluster, rows = _local_and_cluster(client, x, y, val, **kw)
    assert torch.equal(local.m, cluster.m) and local.info["converged"]
    assert local.info["evaluations"] == cluster.info["evaluations"]
    opts = dict(solver=solver, ekfac_batches=40)  # 40 of 94 batches: a subsampled pass
    a = ecif.score(local, train, val, solver=ecif.SolverArgs(**opts))
    b = ecif.score(cluster, train, val, solver=ecif.SolverArgs(**opts), rows=rows)
    np.testing.assert_array_equal(a.influence_pos.to_numpy(), b.influence_pos.to_numpy())
    np.testing.assert_array_equal(a.influence_neg.to_numpy(), b.influence_neg.to_numpy())
    if solver == "cg":  # a pair removed: a new partition's blocks, the same refit
        drop = [int(np.argmin(a.influence))]
        r1 = ecif.fit(train, exclude=drop, init=local, **kw)
        r2 = ecif.fit(train, exclude=drop, init=cluster, rows=rows, **kw)
        assert torch.equal(r1.m, r2.m) and not torch.equal(r1.m, local.m)


def test_cluster_newton_fit_with_learned_scale_is_bitwise_local(client, small_blocks):
    x, y = _pairs(2000, 4)
    kw = dict(batch_size=32, logit_scale=10.0, learn_scale=True, optimizer="newton", **F64)
    _, local, cluster, _ = _local_and_cluster(client, x, y, None, **kw)
    assert torch.equal(local.theta(), cluster.theta()) and local.info["converged"]


def test_one_worker_gives_what_two_give(small_blocks):
    x, y = _pairs(2000, 6)
    kw = dict(batch_size=32, logit_scale=10.0, optimizer="lbfgs")
    heads = []
    for workers in (1, 2):
        with open_client(workers=workers) as c:
            assert len(c.scheduler_info()["workers"]) == workers
            heads.append(ecif.fit(ecif.EmbeddingSet(x, y), rows=ecif.ClusterRows(c, x, y), **kw))
    assert torch.equal(heads[0].m, heads[1].m)


def slow_value_grad_terms(ch, state, *args):
    """The gradient term, held 0.3 s a chunk so a worker is busy when the test kills it."""
    time.sleep(0.3)
    return value_grad_terms(ch, state, *args)


def test_a_worker_killed_mid_pass_changes_nothing(small_blocks):
    x, y = _pairs(3000, 6)
    head = ecif.fit(ecif.EmbeddingSet(x, y), batch_size=32, logit_scale=10.0, max_iter=2)
    theta = head.theta() + 0.01
    m, t = HeadObjective(head, x, y).split(theta)
    p = Pass(slow_value_grad_terms, (m, t, False))
    want = HeadObjective(head, x, y).reduce(Pass(value_grad_terms, (m, t, False)))
    cluster = LocalCluster(
        host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        with Client(cluster) as c:
            obj = HeadObjective(head, x, y, rows=ecif.ClusterRows(c, x, y))
            obj.reduce(Pass(value_grad_terms, (m, t, False)))  # blocks now held by both
            held = {w for w, keys in c.has_what().items() if keys}
            assert len(held) == 2
            with killing_one_busy_worker(c) as killed:
                got = obj.reduce(p)  # 24 blocks x 0.3 s: the kill lands mid-pass
            assert killed and killed[0] not in c.scheduler_info()["workers"]
    finally:
        cluster.close()
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_cluster_sampled_fit_and_solve_are_bitwise_local(client, small_blocks):
    x, y = _pairs(6000, 4)  # 188 batches; a 24-batch sample spread over the blocks
    val = ecif.EmbeddingSet(*_pairs(300, 4, seed=1))
    kw = dict(batch_size=32, logit_scale=10.0, optimizer="lbfgs", sample_batches=24)
    train, local, cluster, rows = _local_and_cluster(client, x, y, val, **kw)
    assert local.info["sample_batches"] == 24 and local.info["converged"]
    assert torch.equal(local.m, cluster.m) and local.info["passes"] == cluster.info["passes"]
    opts = ecif.SolverArgs(solver="cg", sample_batches=24)
    a = ecif.score(local, train, val, solver=opts)
    b = ecif.score(cluster, train, val, solver=opts, rows=rows)
    assert a.attrs["solver"]["sample_batches"] == 24
    np.testing.assert_array_equal(a.influence.to_numpy(), b.influence.to_numpy())
