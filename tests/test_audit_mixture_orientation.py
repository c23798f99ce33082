"""Which of the mixture's two components holds the suspects, when the signals disagree."""

import numpy as np

from ecif.audit.combine import fit_mixture
from ecif.audit.metrics import average_precision


def _group(n=2000, rate=0.2, shift=(0.0, 0.0, 0.0), seed=0):
    """Three unit-Gaussian suspicions; a planted group of ``rate`` moved by ``shift``."""
    g = np.random.default_rng(seed)
    grouped = g.random(n) < rate
    z = g.standard_normal((n, 3)) + np.outer(grouped, shift)
    return grouped, dict(zip(("pair_loss", "clip_score", "influence"), z.T))


def test_a_group_apart_that_the_signals_disagree_on_is_the_suspects():
    # recurring template captions: a high loss, and the lowest self-influence of all
    grouped, sus = _group(shift=(4.0, 0.5, -4.7))
    sums = np.stack([v for v in sus.values()], 1).sum(1)
    # the rule it replaces: the larger summed suspicion would have named the bulk
    assert sums[grouped].mean() < sums[~grouped].mean()
    mix = fit_mixture(sus)
    assert abs(mix.weights[1] - grouped.mean()) < 0.03  # the suspects are the group apart
    assert average_precision(grouped, mix.log_odds(sus)) > 0.95
    # the same group with the suspicions' other orientation flipped: nothing to decide
    agree = {**sus, "influence": -sus["influence"]}
    assert average_precision(grouped, fit_mixture(agree).log_odds(agree)) > 0.95


def test_a_clean_cluster_apart_is_not_flagged():
    # duplicates fit well and bend nothing: apart from the bulk and less suspect on every
    # signal, or more suspect on one by less than an IQR (a slightly lower pretrained score)
    for shift in ((-4.0, -3.0, -4.0), (-4.0, 0.5, -4.0)):
        grouped, sus = _group(shift=shift, seed=1)
        mix = fit_mixture(sus)
        assert mix.valley >= 1.0  # clearly apart: the case the rule has to get right
        assert mix.weights[1] > 0.5  # the suspects' side is the majority, not the cluster
        assert average_precision(grouped, mix.log_odds(sus)) < grouped.mean() + 0.05
