"""The DEN-style learner: exact protection by splits, expansion/pruning counts, split choice."""

import pytest
import torch

from ecif.companions.continual import (
    DENConfig,
    DENLearner,
    changed_units,
    permuted_tasks,
    rescale_damage,
    restore_damage,
    split_gain,
    split_tasks,
    synthetic_xy,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tasks():
    x, y = synthetic_xy(500, 16, 4, seed=0)
    return permuted_tasks(x, y, 3, seed=0)


def _learner(**kw):
    base = dict(hidden=(24, 12), steps=50, seed=3)
    return DENLearner(16, DENConfig(**(base | kw)))


def _learn(lrn, tasks, upto):
    for t in tasks[:upto]:
        lrn.learn_task(t.x_train, t.y_train, t.n_classes)


@pytest.mark.parametrize("top_m, exact", [(10**9, True), (0, False)])
def test_split_of_all_moved_units_gives_old_tasks_their_old_outputs(tasks, top_m, exact):
    lrn = _learner(split_top_m=top_m, split_retrain_steps=10)
    _learn(lrn, tasks, 2)
    recorded = [lrn.predict(tasks[s].x_test, s) for s in range(2)]
    rep = lrn.learn_task(tasks[2].x_train, tasks[2].y_train)
    after = [lrn.predict(tasks[s].x_test, s) for s in range(2)]
    assert [torch.equal(a, b) for a, b in zip(recorded, after)] == [exact, exact]
    if exact:
        assert all(len(s) > 0 for s in rep.split)
    else:  # without splits the old tasks drift (selective retraining moved shared units)
        assert rep.split == [[], []] and sum(int(c.numel()) for c in rep.candidates) > 0


def test_matched_top_m_splits_exactly_m_units_per_layer(tasks):
    counts = {}
    for crit in ("euclidean", "angular", "random"):
        lrn = _learner(split_top_m=3, drift=crit, split_retrain_steps=5)
        _learn(lrn, tasks, 1)
        before = lrn.net.unit_counts()
        rep = lrn.learn_task(tasks[1].x_train, tasks[1].y_train)
        assert [len(s) for s in rep.split] == [3, 3]
        grown = [b + e - p + 3 for b, e, p in zip(before, rep.expanded, rep.pruned)]
        assert lrn.net.unit_counts() == grown
        counts[crit] = rep.split
        scores = rep.drift[0]
        chosen = torch.isin(rep.candidates[0], torch.tensor(rep.split[0]))
        assert float(scores[chosen].min()) >= float(scores[~chosen].max())
    assert counts["euclidean"] != counts["random"]


def test_threshold_mode_splits_units_over_threshold_up_to_cap(tasks):
    lrn = _learner(drift="angular", split_threshold=0.02, max_split_per_layer=4)
    _learn(lrn, tasks, 2)
    rep = lrn.reports[-1]
    for cand, score, split in zip(rep.candidates, rep.drift, rep.split):
        over = cand[score > 0.02]
        assert len(split) == min(4, len(over))
        assert set(split) <= set(over.tolist())


def test_expansion_adds_k_units_and_group_lasso_prunes_them(tasks):
    never = _learner(loss_threshold=1e9, split_top_m=0)
    _learn(never, tasks, 2)
    assert never.reports[1].expanded == [] and never.net.unit_counts() == [24, 12]

    keep = _learner(loss_threshold=0.0, group_lasso=0.0, split_top_m=0, expand_k=5)
    _learn(keep, tasks, 2)
    assert keep.reports[1].expanded == [5, 5] and keep.reports[1].pruned == [0, 0]
    assert keep.net.unit_counts() == [29, 17]
    assert keep.net.alive(0, 0).tolist() == list(range(24))  # task 0 ignores the new units

    prune = _learner(loss_threshold=0.0, group_lasso=10.0, split_top_m=0, expand_k=5)
    _learn(prune, tasks, 2)
    assert prune.reports[1].expanded == [5, 5] and prune.reports[1].pruned == [5, 5]
    assert prune.net.unit_counts() == [24, 12]


def test_restore_damage_is_a_pure_measurement(tasks):
    lrn = _learner(split_top_m=0)
    _learn(lrn, tasks, 1)
    seen = {}

    def hook(learner, task, snap, rep):
        units = changed_units(learner.net, snap, 0, task)
        w = learner.net.layers[0].weight.clone()
        sets = [(tasks[0].x_val, tasks[0].y_val)]
        seen["dmg"] = restore_damage(learner.net, snap, 0, units, sets)
        seen["resc"] = rescale_damage(learner.net, 0, units, 0.5, sets)
        assert torch.equal(learner.net.layers[0].weight, w)
        # top hidden layer: its consumers are the frozen old heads, so splitting a unit alone
        # buys the old tasks exactly what restoring its incoming weights does
        top = changed_units(learner.net, snap, 1, task)
        counts = learner.net.unit_counts()
        gain = split_gain(learner.net, snap, 1, top, sets, task)
        assert learner.net.unit_counts() == counts  # trial splits happen on copies
        assert torch.allclose(gain, restore_damage(learner.net, snap, 1, top, sets), atol=1e-6)
        bottom = split_gain(learner.net, snap, 0, units, sets, task)
        assert not torch.allclose(bottom, seen["dmg"], atol=1e-6)  # consumers' column matters

    lrn.learn_task(tasks[1].x_train, tasks[1].y_train, before_split=hook)
    assert seen["dmg"].numel() > 0 and bool((seen["dmg"] != 0).any())
    assert bool((seen["resc"] != 0).any())


def test_split_tasks_relabel_classes():
    x, y = synthetic_xy(300, 8, 4, seed=1)
    ts = split_tasks(x, y, [(0, 1), (2, 3)], seed=0)
    assert [t.n_classes for t in ts] == [2, 2]
    assert all(int(t.y_train.max()) <= 1 for t in ts)
    n = sum(t.x_train.shape[0] + t.x_val.shape[0] + t.x_test.shape[0] for t in ts)
    assert n == 300
