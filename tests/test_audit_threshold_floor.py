"""The threshold where the suspect mixture barely has two modes: with planted probes its count
is not trusted, and the fallback flags as many pairs as score like the shuffled-caption
probes when that is more than 10%. Checked on known score distributions (the pooled probes'
count is twice the noise there; the shuffled probes' is right) and on real audits of a
continuous-latent geometry and a CLIP-like one without validation pairs, where the rule
before flagged 1.3-1.8x the planted noise."""

import numpy as np
import pytest

import ecif
from ecif.audit.misalign import ProbeSignals
from ecif.audit.thresholds import (
    FALLBACK_FRACTION,
    MAX_CHECKED_RATE,
    MIN_CHECKED_VALLEY,
    NoiseRate,
    flag_count,
    mixture_noise_rate,
    spike_in_rate,
)


@pytest.mark.parametrize("seed", range(3))
def test_the_shuffled_probes_count_plain_noise_that_the_pooled_probes_count_twice(seed):
    g = np.random.default_rng(seed)
    n, m = 4000, 300
    bad = g.random(n) < 0.2
    real = np.where(bad, g.normal(5.0, 1.0, n), g.normal(0.0, 1.0, n))
    # planted in order, a third each: shuffled captions (like the noise), nearest-image
    # captions (hardly worse than a clean pair) and generic ones
    probes = np.r_[g.normal(5.0, 1.0, m // 3), g.normal(0.3, 1.0, m // 3), g.normal(4.0, 1, m // 3)]
    score = np.r_[real, probes]
    is_probe = np.r_[np.zeros(n, bool), np.ones(m, bool)]
    kinds = np.r_[np.full(n, ""), np.repeat(["shuffle", "near", "generic"], m // 3)]
    assert spike_in_rate(score, is_probe) > 1.6 * bad.mean()  # why the pooled count is no floor
    signals = ProbeSignals({}, is_probe, None, kinds)
    assert signals.shuffled_rate(score) == pytest.approx(bad.mean(), abs=0.03)
    # with clean rows held in the twin: the scores passed are those of the other rows
    with_held = ProbeSignals({}, np.r_[is_probe, np.zeros(500, bool)],
                             np.r_[np.zeros(n + m, bool), np.ones(500, bool)],
                             np.r_[kinds, np.full(500, "")])  # fmt: skip
    assert with_held.shuffled_rate(score) == signals.shuffled_rate(score)
    assert ProbeSignals({}, is_probe).shuffled_rate(score) is None


def test_a_barely_two_mode_mixture_is_not_trusted_with_probes():
    log_odds = np.r_[np.ones(300), -np.ones(700)]  # 30% in the suspect group
    barely = MIN_CHECKED_VALLEY / 2
    assert mixture_noise_rate(log_odds, 3.0, barely).reliable  # no probes: no second count
    rate = mixture_noise_rate(log_odds, 3.0, barely, probe_rate=0.3, shuffled_rate=0.2)
    assert not rate.reliable and "barely dips" in rate.why and rate.shuffled_rate == 0.2
    assert mixture_noise_rate(log_odds, 3.0, MIN_CHECKED_VALLEY, probe_rate=0.3).reliable


@pytest.mark.parametrize(
    "shuffled, share",
    [
        (None, FALLBACK_FRACTION),
        (0.04, FALLBACK_FRACTION),
        (0.18, 0.18),
        (MAX_CHECKED_RATE, MAX_CHECKED_RATE),
        (0.9, FALLBACK_FRACTION),  # over half the set scoring like the probes: no floor
    ],
)
def test_the_fallback_flags_at_least_the_shuffled_probes_count(shuffled, share):
    scores = np.random.default_rng(0).normal(size=1000)
    rate = NoiseRate(0.34, False, "the mixture's density barely dips", 0.33, shuffled)
    count, how = flag_count(scores, "auto", rate)
    assert count == round(share * 1000) and "UNRELIABLE" in how
    assert ("as many as score like planted shuffled" in how) == (share > FALLBACK_FRACTION), how
    assert f"flagged the top {100 * share:.3g}%" in how
    assert ("no count can be read" in how) == (shuffled == 0.9), how


@pytest.mark.parametrize("seed", range(2))
def test_four_dimensional_embeddings_flag_the_fallback_not_half_the_set(seed):
    """At d = 4 the scores barely rank the noise (AP about 0.24 against 0.20 by chance) and
    the planted shuffled captions score like the set's own pairs: the rule before read their
    count (about 100%) as a floor capped at 50%, and flagged half the set."""
    x, y, frame = ecif.datasets.concept_pairs(2000, 4, 0.2, "mixed", seed=seed)
    with pytest.warns(UserWarning):
        table = _audit(x, y, None, seed)
    combination = table.attrs["combination"]
    assert combination["shuffled_probe_rate"] > MAX_CHECKED_RATE  # the probes tell nothing
    how = table.attrs["threshold"]
    assert table["is_misaligned"].mean() == pytest.approx(FALLBACK_FRACTION, abs=0.002), how
    assert "no count can be read" in how, how


def _audit(x, y, val, seed):
    return ecif.Auditor(
        ecif.EmbeddingSet(x, y, logit_scale=100.0), val, ecif.AuditArgs(seed=seed)
    ).run()


def test_a_continuous_latent_with_shuffled_captions_flags_about_the_planted_count():
    """latent_clip, 20% shuffled captions: the rule before trusted a 34% count (1.7x)."""
    x, y, bad = ecif.datasets.latent_pairs("latent_clip", "shuffle", 0.2, 0, 2000)
    xv, yv, _ = ecif.datasets.latent_pairs("latent_clip", "shuffle", 0.0, 10_000, 500)
    with pytest.warns(UserWarning):
        table = _audit(x, y, ecif.EmbeddingSet(xv, yv, logit_scale=100.0), 0)
    flagged = table["is_misaligned"].to_numpy()
    how = table.attrs["threshold"]
    assert 0.75 * bad.sum() <= flagged.sum() <= 1.25 * bad.sum(), how
    assert bad[flagged].mean() > 0.85, how  # what is flagged is mostly the noise
    assert "shuffled captions" in how and "barely dips" in how, how
    assert "Planted probes imply" not in how  # the pooled count, twice the noise here: unsaid
    combination = table.attrs["combination"]
    assert combination["shuffled_probe_rate"] < combination["probe_rate"]


def test_clip_like_shuffles_without_validation_pairs_flag_about_the_planted_count():
    """clip_like, 20% shuffled captions, no validation set (seed 2): the rule before trusted a
    26% count (1.3x) from a mixture whose density barely dipped."""
    x, y, frame = ecif.datasets.concept_pairs(2000, 64, 0.2, "shuffle", seed=2)
    bad = frame["is_corrupted"].to_numpy()
    table = _audit(x, y, None, 2)
    flagged = table["is_misaligned"].to_numpy()
    how = table.attrs["threshold"]
    assert 0.75 * bad.sum() <= flagged.sum() <= 1.15 * bad.sum(), how
    assert bad[flagged].mean() > 0.85, how


def test_a_sharded_rerun_keeps_the_shuffled_probes_count(tmp_path):
    """``ecif score`` writes the floor's count (``shuffled_probe_rate``) with the audit, so a
    rerun that keeps every shard flags as the first run did, not the 10% fallback."""
    import json

    import pandas as pd

    from ecif.audit.shards import score_shards
    from ecif.data import layout

    x, y, bad = ecif.datasets.latent_pairs("latent_clip", "shuffle", 0.2, 0, 2000)
    xv, yv, _ = ecif.datasets.latent_pairs("latent_clip", "shuffle", 0.0, 10_000, 500)
    folder, parts = tmp_path / "emb", 4
    for k, rows in enumerate(np.array_split(np.arange(len(x)), parts)):
        meta = pd.DataFrame({"key": [f"p{i}" for i in rows], "status": "ok", "error_message": None})
        layout.write_part(folder, k, x[rows], y[rows], meta, {"source": f"{k:05d}.parquet"})
    layout.write_manifest(folder, {"id_column": "key", "logit_scale": 100.0, "parts": [
        {"index": k, "source": f"/in/{k:05d}.parquet"} for k in range(parts)]})  # fmt: skip
    val = ecif.EmbeddingSet(xv, yv, logit_scale=100.0)
    out = tmp_path / "audit"
    score_shards(folder, out, val, args=ecif.AuditArgs(seed=0), log=lambda s: None)
    first = json.loads((out / "audit.json").read_text())
    assert "shuffled captions" in first["threshold"], first["threshold"]
    assert 0.75 * bad.sum() <= first["flagged"] <= 1.25 * bad.sum()
    said = []
    score_shards(folder, out, val, args=ecif.AuditArgs(seed=0), log=said.append)
    assert "only the threshold is applied again" in said[0]
    again = json.loads((out / "audit.json").read_text())
    assert (again["threshold"], again["flagged"]) == (first["threshold"], first["flagged"])
