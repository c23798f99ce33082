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
