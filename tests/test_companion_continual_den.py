"""DEN's own split rule (threshold, least drifted first), the 784-d digits, dead units (issue 18).

Expected values are computed by hand in the comments, not by the code under test.
"""

import math

import pytest
import torch

from ecif.companions.continual import (
    DENConfig,
    DENLearner,
    TaskReport,
    choose_splits,
    digits28_xy,
    digits_xy,
    synthetic_xy,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCORES = torch.tensor([0.30, 0.02, 0.07, 0.50, 0.06, 0.09])


def test_least_pick_takes_the_least_drifted_units_over_the_threshold():
    # over 0.05: positions 0 (0.30), 2 (0.07), 3 (0.50), 4 (0.06), 5 (0.09)
    # ascending: 4, 2, 5, 0, 3 -> DEN's argsort(drifts)[:2] keeps 4 and 2
    assert choose_splits(SCORES, None, 0.05, 2, "least").tolist() == [4, 2]
    assert choose_splits(SCORES, None, 0.05, None, "least").tolist() == [4, 2, 5, 0, 3]
    # the most-drifted pick of the same rule: 3 (0.50), 0 (0.30)
    assert choose_splits(SCORES, None, 0.05, 2, "most").tolist() == [3, 0]
    # matched m ignores the threshold: the two most / least drifted of all
    assert choose_splits(SCORES, 2, 0.05, None, "most").tolist() == [3, 0]
    assert choose_splits(SCORES, 2, 0.05, None, "least").tolist() == [1, 4]


def test_threshold_is_strict_and_ties_keep_candidate_order():
    s = torch.tensor([0.05, 0.2, 0.06, 0.2])
    assert choose_splits(s, None, 0.05, 1, "least").tolist() == [2]  # 0.05 is not over 0.05
    assert choose_splits(s, None, 0.05, 2, "most").tolist() == [1, 3]
    assert choose_splits(s, None, 0.5, 10, "least").numel() == 0
    with pytest.raises(ValueError):
        choose_splits(s, None, 0.05, 1, "ascending")
    with pytest.raises(ValueError):
        DENConfig(split_pick="ascending")


def _learner_with_known_drift(pick: str, drift: str):
    """Layer-0 units with hand-set drift at task 1; layer 1 untouched (no candidates).

    Before task 1: unit 0 all zero, units 1-7 = 2 * e0. During it: unit 0 stays zero (only its
    bias moves, so it is a candidate), unit 1 dies (-> 0), units 2-5 rotate in the (e0, e1)
    plane by pi * (0.30, 0.02, 0.07, 0.06), units 6-7 do not move.
    """
    x, y = synthetic_xy(120, 6, 3, seed=0)
    cfg = DENConfig(
        hidden=(8, 5),
        steps=3,
        drift=drift,
        split_top_m=None,
        split_threshold=0.05,
        max_split_per_layer=2,
        split_pick=pick,
        seed=0,
    )
    lrn = DENLearner(6, cfg)
    lrn.learn_task(x, y, 3)
    w0 = lrn.net.layers[0].weight
    with torch.no_grad():
        w0.zero_()
        w0[1:, 0] = 2.0
    snap = lrn.net.snapshot()
    task = lrn.net.add_head(2, lrn.gen)
    with torch.no_grad():
        lrn.net.layers[0].bias[0] += 0.1
        w0[1] = 0.0
        for j, frac in zip((2, 3, 4, 5), (0.30, 0.02, 0.07, 0.06)):
            w0[j, 0], w0[j, 1] = 2 * math.cos(math.pi * frac), 2 * math.sin(math.pi * frac)
    rep = TaskReport(task=task)
    lrn._split(task, snap, rep, None)
    return lrn, rep, x


@pytest.mark.parametrize(
    "drift, pick, expect_drift, expect_split",
    [
        # angular: dead 0, died 1, rotations pi*f -> f; over 0.05: 1, 2, 4, 5
        ("angular", "least", [0.0, 1.0, 0.30, 0.02, 0.07, 0.06], [4, 5]),
        ("angular", "most", [0.0, 1.0, 0.30, 0.02, 0.07, 0.06], [1, 2]),
        # euclidean: dead 0, died = old norm 2, chord of radius 2 = 4 sin(pi f / 2):
        # 1.8160, 0.1257, 0.4389, 0.3765; all but unit 0 are over 0.05
        ("euclidean", "least", [0.0, 2.0, 1.8160, 0.1257, 0.4389, 0.3765], [3, 5]),
        ("euclidean", "most", [0.0, 2.0, 1.8160, 0.1257, 0.4389, 0.3765], [1, 2]),
    ],
)
def test_den_rule_in_the_learner_on_hand_made_drift(drift, pick, expect_drift, expect_split):
    lrn, rep, x = _learner_with_known_drift(pick, drift)
    assert rep.candidates[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.allclose(rep.drift[0], torch.tensor(expect_drift), atol=1e-4)
    assert rep.split[0] == expect_split and rep.split[1] == []
    assert 0 not in rep.split[0]  # the dead unit is never over any positive threshold
    assert torch.isfinite(lrn.net(x, 1)).all() and torch.isfinite(lrn.net(x, 0)).all()


def test_digits28_are_the_bundled_digits_centred_in_a_28x28_frame():
    x, y = digits28_xy()
    x8, y8 = digits_xy()
    assert x.shape == (1797, 784) and torch.equal(y, y8)
    img = x.view(-1, 28, 28)
    frame = torch.ones(28, 28, dtype=torch.bool)
    frame[4:24, 4:24] = False
    assert float(img[:, frame].abs().max()) == 0.0  # the 4-pixel border is exactly zero
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # bilinear 8 -> 20 without corner alignment: output pixel (i, j) samples the source at
    # ((i + 0.5) * 8 / 20 - 0.5, ...); pixel (2, 2) of the box is source (0.5, 0.5), the mean
    # of the top-left 2x2 source block
    want = x8.view(-1, 8, 8)[:, :2, :2].mean((1, 2))
    assert torch.allclose(img[:, 4 + 2, 4 + 2], want, atol=1e-6)


# Reproducibility of the benchmark (issue 18): the same small command line twice gives the same
# tables and per-run figures, and those figures match a learner run here by hand.

SMALL = "--seeds 2 --steps 3 --tasks 2 --hidden 16 8 --corr-units 6 --workers 1".split()


def _bench():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_continual

    return bench_continual


def _strip(results) -> str:
    """Every figure but the timings; repr keeps all float digits and prints NaN equal to NaN."""
    return repr([{k: v for k, v in r.items() if k != "seconds"} for r in results])


def test_small_benchmark_gives_identical_figures_twice_and_matches_a_direct_run():
    from ecif.companions.continual import permuted_tasks

    bench = _bench()
    args = bench.build_parser().parse_args(SMALL)
    res1, text1 = bench.run(args)
    res2, text2 = bench.run(bench.build_parser().parse_args(SMALL + ["--workers", "2"]))
    assert text1 == text2 and _strip(res1) == _strip(res2)
    assert "| den-angular |" in text1 and "Spearman" in text1
    by = {(r["seed"], r["method"]): r for r in res1}
    assert len(by) == 12  # 2 seeds x 6 arms
    assert by[(0, "none")]["acc"] != by[(1, "none")]["acc"]  # seeds are not ignored

    # the same no-split and DEN-rule runs, built here without the benchmark's code
    tasks = permuted_tasks(*digits28_xy(), 2, seed=1)
    for method, extra in [
        ("none", dict(split_top_m=0)),
        ("den-euclidean", dict(split_top_m=None, split_threshold=0.05, split_pick="least")),
    ]:
        cfg = DENConfig(hidden=(16, 8), steps=3, l1=3e-4, seed=1, **extra)
        lrn = DENLearner(784, cfg)
        for t in tasks:
            lrn.learn_task(t.x_train, t.y_train, t.n_classes)
        acc = sum(lrn.evaluate(t.x_test, t.y_test, s)[0] for s, t in enumerate(tasks)) / 2
        w = lrn.net.layers[0].weight[lrn.net.alive(0, 1)]
        r = by[(1, method)]
        assert r["acc"] == pytest.approx(acc, abs=1e-12)
        assert r["zero_share"][0] == pytest.approx(float((w == 0).float().mean()), abs=1e-12)
        assert r["split"] == sum(len(s) for rep in lrn.reports for s in rep.split)
        assert r["nonzero"] == lrn.net.n_nonzero()


@pytest.mark.parametrize("drift", ["euclidean", "angular"])
def test_dead_units_in_a_strong_l1_run_have_zero_drift_and_are_never_split(drift):
    # L1 0.03 per step zeroes whole rows within a few steps (dead units)
    from ecif.companions.continual import incoming, permuted_tasks

    tasks = permuted_tasks(*digits28_xy(), 2, seed=0)
    cfg = DENConfig(hidden=(16, 8), steps=3, l1=0.03, drift=drift, split_top_m=None)
    cfg.split_pick = "least"
    lrn = DENLearner(784, cfg)
    lrn.learn_task(tasks[0].x_train, tasks[0].y_train, 10)
    dead = {}

    def hook(learner, task, snap, rep):
        for layer, cand in enumerate(rep.candidates):
            units = learner.net.alive(layer, task)
            units = units[units < snap.weights[layer].shape[0]]
            old, new = incoming(learner.net, snap, layer, units, False)
            dead[layer] = set(units[(old == 0).all(1) & (new == 0).all(1)].tolist())
            is_dead = torch.tensor([int(c) in dead[layer] for c in cand], dtype=torch.bool)
            # a dead unit moves at most its bias; if it is a candidate, its drift is 0
            assert torch.equal(rep.drift[layer][is_dead], torch.zeros(int(is_dead.sum())))

    rep = lrn.learn_task(tasks[1].x_train, tasks[1].y_train, 10, before_split=hook)
    assert len(dead[0]) > 0  # the regime does make dead units
    for layer, split in enumerate(rep.split):
        assert not set(split) & dead[layer]
    assert all(torch.isfinite(lrn.net(t.x_test, s)).all() for s, t in enumerate(tasks))
