"""The automatic threshold's noise rate, checked against planted probes: the spike-in count
recovers a planted rate, a suspect group much larger than the probes' count is not trusted
unless it is clearly apart, and on real audits the threshold neither over-counts while
calling itself reliable (5% noise, tiny CLIP) nor falls back on a clear 35% (aligned)."""

import numpy as np
import pandas as pd
import pytest

import ecif
from ecif.audit.misalign import split_trusted
from ecif.audit.thresholds import (
    CLEAR_VALLEY,
    MAX_CHECKED_RATE,
    MAX_RATE,
    MIN_CHECKED_VALLEY,
    NoiseRate,
    flag_count,
    mixture_noise_rate,
    spike_in_rate,
)


@pytest.mark.parametrize("seed", range(4))
def test_spike_in_rate_recovers_a_planted_rate_of_noise_like_the_probes(seed):
    g = np.random.default_rng(seed)
    n, planted = 4000, 0.1
    bad = g.random(n) < planted
    real = np.where(bad, g.normal(4.0, 1.0, n), g.normal(0.0, 1.0, n))
    probes = g.normal(4.0, 1.0, 300)
    score = np.r_[real, probes, np.nan]  # a NaN row (a failed pair) is not counted
    is_probe = np.r_[np.zeros(n, bool), np.ones(300, bool), False]
    assert spike_in_rate(score, is_probe) == pytest.approx(bad.mean(), abs=0.025)
    # noise subtler than the probes is undercounted: the check's known bias, one-sided
    subtle = np.where(bad, g.normal(2.0, 1.0, n), g.normal(0.0, 1.0, n))
    assert spike_in_rate(np.r_[subtle, probes], is_probe[:-1]) < 0.5 * bad.mean()


def test_the_rate_check_against_probes():
    log_odds = np.r_[np.ones(150), -np.ones(850)]  # 15% in the suspect group
    shallow, clear = 0.3, CLEAR_VALLEY + 0.5
    assert MIN_CHECKED_VALLEY < shallow < CLEAR_VALLEY
    assert mixture_noise_rate(log_odds, 3.0, shallow).reliable  # no probes: the old rule
    over = mixture_noise_rate(log_odds, 3.0, shallow, probe_rate=0.06)
    assert not over.reliable and "planted probes imply" in over.why
    assert "UNRELIABLE" in flag_count(log_odds, "auto", over)[1]
    agree = mixture_noise_rate(log_odds, 3.0, shallow, probe_rate=0.12)
    assert agree.reliable and agree.probe_rate == 0.12
    assert "planted probes: 12.0%" in flag_count(log_odds, "auto", agree)[1]
    # a group clearly apart needs no agreement (probes undercount noise unlike them)
    assert mixture_noise_rate(log_odds, 3.0, clear, probe_rate=0.02).reliable
    # above MAX_RATE only with probes that agree
    many = np.r_[np.ones(400), -np.ones(600)]
    assert not mixture_noise_rate(many, 4.0, clear).reliable
    assert mixture_noise_rate(many, 4.0, clear, probe_rate=0.38).reliable
    assert not mixture_noise_rate(many, 4.0, shallow, probe_rate=0.2).reliable
    assert not mixture_noise_rate(np.r_[np.ones(600), -np.ones(400)], 4.0, clear, 0.6).reliable
    assert MAX_RATE < 0.4


def test_the_ranking_trusts_a_clear_split_the_count_does_not():
    many = np.r_[np.ones(400), -np.ones(600)]  # 40%: above what the count trusts unchecked
    clear, shallow = CLEAR_VALLEY + 0.5, 0.1
    rate = mixture_noise_rate(many, 4.0, clear)
    assert not rate.reliable and MAX_RATE < rate.rate <= MAX_CHECKED_RATE
    assert split_trusted(rate, 4.0, clear)  # groups clearly apart: the ranking leans on it
    assert not split_trusted(mixture_noise_rate(many, 4.0, shallow), 4.0, shallow)
    assert not split_trusted(NoiseRate(0.4, False), 1.5, clear)  # components not apart
    assert not split_trusted(NoiseRate(0.6, False), 4.0, clear)  # suspects not a minority
    assert split_trusted(mixture_noise_rate(many[200:], 3.0, shallow), 3.0, shallow)


def test_a_clear_35_percent_is_trusted_not_the_10_percent_fallback():
    """35% boilerplate captions over an aligned encoder: the suspects are plainly apart, but the
    old rule trusted no rate above 30% and flagged the top 10% (0.29x the noise)."""
    x, y, frame = ecif.datasets.concept_pairs(
        2000, 32, 0.35, "boilerplate", seed=0, geometry="aligned"
    )
    xv, yv, _ = ecif.datasets.concept_pairs(500, 32, 0.0, seed=10_000, geometry="aligned")
    table = ecif.Auditor(
        ecif.EmbeddingSet(x, y, logit_scale=100.0), ecif.EmbeddingSet(xv, yv, logit_scale=100.0)
    ).run()
    planted = int(frame["is_corrupted"].sum())
    flagged = int(table["is_misaligned"].sum())
    assert "estimated noise rate" in table.attrs["threshold"], table.attrs["threshold"]
    assert 0.9 * planted <= flagged <= 1.15 * planted, (flagged, planted)
    flagged_bad = frame["is_corrupted"].to_numpy()[table["is_misaligned"].to_numpy()]
    assert flagged_bad.mean() > 0.9  # and the flags are the noise


def test_a_5_percent_suspect_group_that_takes_in_clean_pairs_is_not_trusted():
    """5% mixed noise (shuffled and near-miss captions) on shapes, tiny CLIP: the mixture's
    suspect group held 12.5% of pairs and the old rule called that reliable (2.5x the noise).
    Now: a rate within 1.5x of the truth, or UNRELIABLE and the fallback."""
    from ecif.data.models import load_model
    from ecif.data.tiny_clip import images_to_tensor, tiny_clip

    lm = load_model(f"local-dir:{tiny_clip()}", device="cpu")

    def embed(data):
        import torch

        with torch.no_grad():
            x = lm.model.encode_image(images_to_tensor(data.images, lm.image_size), normalize=True)
            y = lm.model.encode_text(lm.tokenizer(list(data.captions)), normalize=True)
        return x.numpy(), y.numpy()

    train = ecif.datasets.shapes(2000, seed=0, noise=0.05, noise_kind="mixed")
    val = ecif.datasets.shapes(500, seed=10_000, noise=0.0)
    meta = pd.DataFrame({"caption": train.captions})
    x, y = embed(train)
    table = ecif.Auditor(
        ecif.EmbeddingSet(x, y, metadata=meta, logit_scale=lm.logit_scale),
        ecif.EmbeddingSet(*embed(val), logit_scale=lm.logit_scale),
        ecif.AuditArgs(seed=0),
    ).run()
    planted = int(train.frame["is_corrupted"].sum())
    flagged = int(table["is_misaligned"].sum())
    how = table.attrs["threshold"]
    print(flagged, planted, how)
    if "UNRELIABLE" not in how:
        assert flagged <= 1.5 * planted, how
    assert flagged <= 2.05 * planted  # the 10% fallback at most


def test_the_fallback_quotes_the_probes_count_once():
    scores = np.r_[np.ones(100), -np.ones(900)]
    quiet = NoiseRate(0.45, False, "no separate group of suspects (separation 1.70)", 0.004)
    count, how = flag_count(scores, "auto", quiet)
    assert count == 100 and "Planted probes imply 0.4%" in how and "UNRELIABLE" in how
    checked = NoiseRate(
        0.15, False, "15.0% ..., over 1.5x the 6.0% that planted probes imply", 0.06
    )
    assert "Planted probes imply" not in flag_count(scores, "auto", checked)[1]  # said already
    assert "Planted probes" not in flag_count(scores, "auto", NoiseRate(0.4, False, "x"))[1]
    # probes that count more than the 10% flagged: the sentence must not call the set cleaner
    many = NoiseRate(0.509, False, "50.9% in the suspect group, outside the 0-50%", 0.836)
    how = flag_count(scores, "auto", many)[1]
    assert "Planted probes imply 83.6%" in how and "cleaner" not in how and "more noise" in how


def test_a_clean_set_is_flagged_by_the_fallback_and_the_probes_say_it_may_be_clean():
    """No noise at all: no split is trusted, so the top 10% is flagged; the planted probes'
    count, quoted beside it, is what tells the user the set may be clean (truth: 0%)."""
    x, y, frame = ecif.datasets.concept_pairs(1500, 32, 0.0, seed=1, geometry="aligned")
    xv, yv, _ = ecif.datasets.concept_pairs(400, 32, 0.0, seed=10_001, geometry="aligned")
    assert not frame["is_corrupted"].any()
    from ecif.audit.thresholds import UnreliableThresholdWarning

    with pytest.warns(UnreliableThresholdWarning) as said:  # the Python API says so too
        table = ecif.Auditor(
            ecif.EmbeddingSet(x, y, logit_scale=100.0),
            ecif.EmbeddingSet(xv, yv, logit_scale=100.0),
            ecif.AuditArgs(seed=1),
        ).run()
    how = table.attrs["threshold"]
    assert [str(w.message) for w in said] == [f"is_misaligned: {how}"]
    probe_rate = table.attrs["combination"]["probe_rate"]
    assert "UNRELIABLE" in how and int(table["is_misaligned"].sum()) == 150, how
    assert probe_rate < 0.02 and f"Planted probes imply {probe_rate:.1%}" in how, how


def test_ecif_score_says_an_unreliable_threshold_once(tmp_path, capsys):
    """The summary's last line carries the sentence; Python's warning is not printed too."""
    from ecif.cli import main

    x, y, _ = ecif.datasets.concept_pairs(600, 32, 0.0, seed=2, geometry="aligned")
    xv, yv, _ = ecif.datasets.concept_pairs(300, 32, 0.0, seed=10_002, geometry="aligned")
    ecif.EmbeddingSet(x, y).save(tmp_path / "train")
    ecif.EmbeddingSet(xv, yv).save(tmp_path / "val")
    argv = ["score", str(tmp_path / "train"), "--val", str(tmp_path / "val")]
    assert main([*argv, "-o", str(tmp_path / "audit"), "--quiet"]) == 0
    said = capsys.readouterr()
    assert said.out.count("UNRELIABLE") == 1 and "UNRELIABLE" not in said.err, said
    assert "UnreliableThresholdWarning" not in said.out + said.err
