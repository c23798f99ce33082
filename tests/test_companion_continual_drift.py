"""Drift criteria and the timestamped network of the continual-learning companion."""

import math

import pytest
import torch

from ecif.companions.continual import NEVER, TimestampedMLP, drift_scores


def test_angular_drift_equals_known_values():
    e1 = torch.tensor([1.0, 0.0, 0.0])
    old = e1.expand(5, 3)
    new = torch.stack(
        [
            e1,
            torch.tensor([0.0, 1.0, 0.0]),
            -e1,
            torch.tensor([0.5, math.sqrt(3) / 2, 0.0]),
            torch.tensor([1.0, 1.0, 0.0]),
        ]
    )
    got = drift_scores(old, new, "angular")
    assert torch.allclose(got, torch.tensor([0.0, 0.5, 1.0, 1 / 3, 0.25]), atol=1e-6)
    assert torch.allclose(drift_scores(old, new, "euclidean")[:3], torch.tensor([0, 2**0.5, 2]))


def test_angular_drift_invariant_to_positive_rescaling_unlike_euclidean():
    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(50, 40, generator=g), torch.randn(50, 40, generator=g)
    c_old = torch.exp(torch.randn(50, 1, generator=g) * 2)  # factors from ~0.01 to ~100
    c_new = torch.exp(torch.randn(50, 1, generator=g) * 2)
    base = drift_scores(old, new, "angular")
    assert torch.allclose(drift_scores(c_old * old, c_new * new, "angular"), base, atol=1e-6)
    assert not torch.allclose(
        drift_scores(c_old * old, c_new * new, "euclidean"), drift_scores(old, new, "euclidean")
    )
    # a negative factor flips the direction: angle becomes 1 - angle
    assert torch.allclose(drift_scores(old, -new, "angular"), 1 - base, atol=1e-6)
    # nearly parallel vectors keep their small angle (no arccos(1 - eps) collapse)
    tiny = drift_scores(old, old + 1e-4 * new, "angular")
    assert bool((tiny > 0).all()) and bool((tiny < 1e-3).all())


def test_rescaling_a_relu_unit_changes_the_function_but_not_the_angle():
    g = torch.Generator().manual_seed(1)
    net = TimestampedMLP(6, [8, 4], generator=g)
    net.add_head(3, g)
    x = torch.randn(20, 6, generator=g)
    before = net(x, 0)
    h_before, _ = net.hidden(x, 0)
    j = int(h_before.mean(0).argmax())  # a unit that is active on this data
    w_old = net.layers[1].weight.clone()
    net.layers[1].weight[j] *= 2.0
    net.layers[1].bias[j] *= 2.0
    h_after, _ = net.hidden(x, 0)
    assert torch.allclose(h_after[:, j], 2 * h_before[:, j])  # ReLU is positively homogeneous
    assert float(drift_scores(w_old, net.layers[1].weight, "angular")[j]) < 1e-6
    assert float(drift_scores(w_old, net.layers[1].weight, "euclidean")[j]) > 0.1
    assert float((net(x, 0) - before).abs().max()) > 1e-3  # ... yet the outputs moved


def test_drift_criteria_are_pluggable_and_checked():
    old, new = torch.ones(4, 3), torch.zeros(4, 3)
    assert torch.equal(
        drift_scores(old, new, lambda a, b, g: (a - b).sum(1)), torch.full((4,), 3.0)
    )
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(drift_scores(old, new, "random", g1), drift_scores(old, new, "random", g2))
    with pytest.raises(KeyError):
        drift_scores(old, new, "manhattan")
    with pytest.raises(ValueError):
        drift_scores(old, new[:, :2], "angular")


def _net_with_two_tasks():
    g = torch.Generator().manual_seed(2)
    net = TimestampedMLP(5, [7, 6], generator=g)
    net.add_head(3, g)
    return net, g


def test_split_restores_old_outputs_bitwise_and_keeps_current_task():
    net, g = _net_with_two_tasks()
    x = torch.randn(30, 5, generator=g)
    rec0 = net(x, 0)
    snap = net.snapshot()
    net.add_head(2, g)
    net.expand(0, 2, 1, g)
    net.layers[1].weight[:, -2:] = torch.randn(net.layers[1].size, 2, generator=g)
    for lay in net.layers:  # simulate training of task 1 on every old unit
        lay.weight[:, :] += 0.3 * torch.randn(lay.weight.shape, generator=g)
        lay.bias += 0.1
    assert not torch.equal(net(x, 0), rec0)
    rec1 = net(x, 1)
    net.split(0, [0, 3, 4, 5, 6, 1, 2], 1, snap)
    net.split(1, list(range(6)), 1, snap)
    assert torch.equal(net(x, 0), rec0)  # bit for bit
    assert torch.allclose(net(x, 1), rec1, atol=1e-5)  # split preserves the new task's function
    assert net.unit_counts() == [7 + 2 + 7, 6 + 6]
    assert net.alive(0, 0).tolist() == list(range(7))
    assert int(net.alive(0, 1).numel()) == 9 and int(net.alive(1, 1).numel()) == 6
    assert net.layers[0].death[:7].tolist() == [1] * 7
    assert bool((net.layers[0].death[7:] == NEVER).all())
    with pytest.raises(ValueError):
        net.split(0, [7], 1, snap)  # a unit born at task 1 cannot be split at task 1


def test_expand_and_remove_change_unit_count_as_specified():
    net, g = _net_with_two_tasks()
    net.add_head(4, g)
    net.expand(0, 3, 1, g)
    net.expand(1, 5, 1, g)
    assert net.unit_counts() == [10, 11]
    assert net.layers[1].weight.shape == (11, 10)
    assert [w.shape[1] for w, _ in net.heads] == [11, 11]
    assert int(net.alive(0, 0).numel()) == 7 and int(net.alive(0, 1).numel()) == 10
    n_before = net.n_params()
    net.remove_units(1, [7, 9], 1)
    net.remove_units(0, [8], 1)
    assert net.unit_counts() == [9, 9]
    assert net.layers[1].weight.shape == (9, 9)
    assert [w.shape[1] for w, _ in net.heads] == [9, 9]
    assert net.n_params() == n_before - (2 * 10 + 2 + 2 * 3 + 2 * 4) - (5 + 1 + 9)
    with pytest.raises(ValueError):
        net.remove_units(0, [0], 1)  # old units are never pruned


def test_split_of_lower_layer_restores_consumers_column_for_old_tasks():
    net, g = _net_with_two_tasks()
    x = torch.randn(30, 5, generator=g)
    rec0 = net(x, 0)
    snap = net.snapshot()
    net.add_head(2, g)
    net.layers[0].weight[[1, 4]] += 0.5  # only two bottom units drift ...
    net.layers[1].weight[:, [1, 4]] *= 3.0  # ... and their outgoing weights
    rec1 = net(x, 1)
    net.split(0, [1, 4], 1, snap)  # the top layer is not split
    assert torch.equal(net(x, 0), rec0)
    assert torch.allclose(net(x, 1), rec1, atol=1e-5)
    assert torch.equal(net.layers[1].weight[:, [1, 4]], snap.weights[1][:, [1, 4]])


# Zero and dead units (issue 18). Expected values are written by hand: a unit whose incoming
# weights are exactly zero before and after did not move (0); one that died (nonzero -> zero) or
# was born (zero -> nonzero) lost or gained its whole direction (1.0, the maximum).


def test_angular_drift_of_unit_zero_before_and_after_is_zero():
    old = torch.zeros(3, 4)
    assert torch.equal(drift_scores(old, old.clone(), "angular"), torch.zeros(3))


def test_angular_drift_of_unit_that_died_or_was_born_is_maximal():
    w = torch.tensor([[0.3, -0.2, 0.0, 1.0], [1e-3, 0.0, 0.0, 0.0]])
    zero = torch.zeros_like(w)
    assert torch.equal(drift_scores(w, zero, "angular"), torch.ones(2))  # died
    assert torch.equal(drift_scores(zero, w, "angular"), torch.ones(2))  # born
    # Euclidean needs no convention: dead -> 0, died -> the old norm
    assert torch.equal(drift_scores(zero, zero, "euclidean"), torch.zeros(2))
    assert torch.allclose(drift_scores(w, zero, "euclidean"), torch.tensor([math.sqrt(1.13), 1e-3]))


def test_angular_drift_mixed_rows_matches_brute_force():
    g = torch.Generator().manual_seed(7)
    old = torch.randn(6, 5, generator=g, dtype=torch.float64)
    new = torch.randn(6, 5, generator=g, dtype=torch.float64)
    old[0] = new[0] = 0.0  # dead
    new[1] = 0.0  # died
    old[2] = 0.0  # born
    got = drift_scores(old, new, "angular")
    expect = [0.0, 1.0, 1.0]
    for a, b in zip(old[3:].tolist(), new[3:].tolist()):
        dot = sum(x * y for x, y in zip(a, b))
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
        expect.append(math.acos(dot / (na * nb)) / math.pi)
    assert torch.allclose(got, torch.tensor(expect, dtype=torch.float64), atol=1e-12)


def test_tiny_nonzero_weights_keep_their_angle():
    # the squared norm of 1e-30 underflows in float32; such a unit is not dead
    old = torch.tensor([[1e-30, 0.0], [1e-30, 1e-30], [1e-30, 0.0]])
    new = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(drift_scores(old, new, "angular"), torch.tensor([0.0, 0.25, 1.0]))


def _learner_with_zero_rows():
    """A learner after task 0 whose bottom layer has dead, died and born units at task 1."""
    from ecif.companions.continual import DENConfig, DENLearner, TaskReport, synthetic_xy

    x, y = synthetic_xy(200, 6, 3, seed=0)
    cfg = DENConfig(hidden=(8, 5), steps=5, drift="angular", split_top_m=3, seed=1)
    lrn = DENLearner(6, cfg)
    lrn.learn_task(x, y, 3)
    w0 = lrn.net.layers[0].weight
    with torch.no_grad():
        w0[[0, 1, 2]] = 0.0  # dead before task 1 (units 0, 1) and born during it (unit 2)
        w0[[3, 4, 5, 6, 7]] = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    snap = lrn.net.snapshot()
    task = lrn.net.add_head(2, lrn.gen)
    with torch.no_grad():
        lrn.net.layers[0].bias[[0, 1]] += 0.1  # moved (bias only): candidates, weights still 0
        w0[2] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # born
        w0[[3, 4]] = 0.0  # died
        w0[5] = -0.5 * w0[5]  # reversed: angle exactly 1 as well
        w0[6] += 0.01  # small drift
        w0[7] *= 2.0  # pure rescaling: angle 0
    return lrn, snap, task, x, TaskReport(task=task)


def test_layer_with_zero_rows_runs_through_selection_and_split():
    lrn, snap, task, x, rep = _learner_with_zero_rows()
    out0 = lrn.net(x, 0)
    before = {}
    lrn._split(task, snap, rep, lambda *_: before.update(drift=rep.drift[0].clone()))
    assert rep.candidates[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    expect = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # dead, dead, born, died, died, reversed
    assert torch.allclose(before["drift"][:6], torch.tensor(expect), atol=1e-6)
    assert 0 < float(before["drift"][6]) < 0.05 and float(before["drift"][7]) < 1e-6
    # top-3 by descending drift, ties in candidate order: born 2, died 3 and 4
    assert rep.split[0] == [2, 3, 4]
    assert not torch.isnan(lrn.net(x, task)).any()
    assert torch.isfinite(out0).all()


def test_bench_rescale_probe_with_dead_units_does_not_crash():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_continual

    lrn, snap, task, x, rep = _learner_with_zero_rows()
    y = torch.zeros(x.shape[0], dtype=torch.long)
    res = bench_continual.rescale_probe(lrn, [(x, y), (x, y)], seed=0)
    assert set(res) >= {"L0x0.5", "L0x2.0", "L1x0.5", "L1x2.0"}
    assert all(math.isfinite(v) for v in res.values())
    with torch.no_grad():
        lrn.net.layers[1].weight.zero_()  # a whole layer of dead units: nothing to rescale
    res = bench_continual.rescale_probe(lrn, [(x, y), (x, y)], seed=0)
    assert math.isnan(res["L1x0.5"]) and math.isnan(res["L1x2.0"])
    assert math.isfinite(res["L0x0.5"]) and math.isfinite(res["L0x2.0"])
