"""The combination without a validation set: the probes' regression is refit without the real
rows its first fit ranks most suspect (the twin's own noise, labelled 'rest'), and a mixture
whose split is not trusted is left out. Checked against the pair's own loss (the best single
signal there) and the planted labels, and against a fit that knows which rows are noise."""

import functools

import numpy as np
import pytest

import ecif
from ecif.audit import misalign, probe_regression
from ecif.audit.combination_text import describe_combination
from ecif.audit.combine import (
    fit_mixture,
    hedged_score,
    probe_weighted_score,
)
from ecif.audit.metrics import average_precision
from ecif.audit.misalign import signal_suspicions
from ecif.audit.probe_regression import cleaned_probe_direction, probe_direction
from ecif.audit.thresholds import CLEAR_VALLEY, MAX_RATE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROBES_ONLY = "probe_weighted_features"


def _recombined(aud, table, base, **options):
    """``probe_weighted_score`` over the audit's own signals and twin, with ``base(mix, sus)``
    as the mixture's part: the default's combination with one of its choices changed."""
    sus = signal_suspicions(table, aud.heads[0].n_norm)
    mix = fit_mixture(sus)
    probes = aud.probes
    return probe_weighted_score(
        mix, sus, base(mix, sus), probes.suspicions, probes.is_probe, **options
    )[0]


def _average_precisions(bad, table, other):
    """AP of the audit's misalign_score, of ``other``, and of the pair's loss alone."""
    scores = (table["misalign_score"].to_numpy(), other, table["pair_loss"].to_numpy())
    return tuple(average_precision(bad, s) for s in scores)


def _angle(a, b):
    return float(np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))))


def test_cleaned_probe_direction_turns_towards_the_fit_without_the_real_noise():
    # feature 0 carries the real noise, and the real noise lies further out on it than the
    # planted probes do; feature 1 carries mostly the probes' own kind
    g = np.random.default_rng(0)
    clean = g.standard_normal((2000, 2))
    noise = g.standard_normal((400, 2)) + [3.0, 0.0]
    probes = g.standard_normal((200, 2)) + [2.0, 1.0]
    f = np.concatenate([clean, noise, probes])
    is_probe = np.r_[np.zeros(2400, bool), np.ones(200, bool)]
    is_noise = np.r_[np.zeros(2000, bool), np.ones(400, bool), np.zeros(200, bool)]

    first, _ = probe_direction(f, is_probe)
    cleaned, _, dropped = cleaned_probe_direction(f, is_probe, 0.2)
    known, _ = probe_direction(f[~is_noise], is_probe[~is_noise])  # labels no user has
    assert dropped == 480  # 20% of the 2,400 real rows
    # measured: 29.5 degrees from the known fit -> 22.3; AP on the real noise 0.634 -> 0.741
    # (the known fit's: 0.913): one refit undoes part of the contamination, not all of it
    assert _angle(cleaned, known) < _angle(first, known) - 5
    real = ~is_probe
    ap_first = average_precision(is_noise[real], f[real] @ first)
    ap_cleaned = average_precision(is_noise[real], f[real] @ cleaned)
    assert ap_cleaned > ap_first + 0.05
    assert cleaned_probe_direction(f, is_probe, 0.0)[2] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_without_validation_the_cleaned_probes_reach_the_pairs_loss(seed, monkeypatch):
    # CLIP-like embeddings, 10% shuffled captions, no validation set: the pair's loss is the
    # best single signal; the shuffled pairs lie further out on it than the planted probes,
    # and the planted generic captions ask for a negative weight on self-influence
    x, y, frame = ecif.datasets.concept_pairs(2000, 64, 0.1, "shuffle", seed=seed)
    aud = ecif.Auditor(ecif.EmbeddingSet(x, y, logit_scale=100.0), None, ecif.AuditArgs(seed=seed))
    table = aud.run()
    bad = frame["is_corrupted"].to_numpy()
    record = table.attrs["combination"]["probe_weights"]
    assert record["dropped"] == 400  # 20% of the twin's 2,000 real rows
    assert "refit without the 400" in describe_combination(table.attrs["combination"])

    assert min(record["weights"]) >= 0  # bounded: no signal counts against suspicion

    alone = record["parts"] == [PROBES_ONLY]
    once = _recombined(aud, table, lambda mix, sus: mix.log_odds(sus), alone=alone)
    signed = functools.partial(probe_regression.probe_direction, nonnegative=False)
    monkeypatch.setattr(probe_regression, "probe_direction", signed)
    signed_once = _recombined(aud, table, lambda mix, sus: mix.log_odds(sus), alone=alone)
    ap, ap_once, ap_loss = _average_precisions(bad, table, once)
    ap_signed = average_precision(bad, signed_once)
    print(
        seed,
        f"AP {ap:.3f}, bounded fit once {ap_once:.3f}, signed fit once {ap_signed:.3f}, "
        f"pair_loss {ap_loss:.3f}",
    )
    # measured: 0.976 / 0.975 / 0.940 / 0.975 (seed 0), 0.963 / 0.961 / 0.926 / 0.961 (seed 1);
    # with near-miss probes from the nearest picture (before 2026-12-08) 0.965 / 0.967 / 0.885
    # / 0.967 and 0.954 / 0.955 / 0.849 / 0.955: the signed fit lost less to them since
    assert ap > ap_signed + 0.025  # the default before the bound and the refit
    assert ap > ap_once - 0.01  # the refit costs nothing where the bound alone suffices
    assert ap > ap_loss - 0.02


def _tiny_clip_embed(data):
    import torch

    from ecif.data.models import load_model
    from ecif.data.tiny_clip import images_to_tensor, tiny_clip

    lm = load_model(f"local-dir:{tiny_clip()}", device="cpu")
    with torch.no_grad():
        x = lm.model.encode_image(images_to_tensor(data.images, lm.image_size), normalize=True)
        y = lm.model.encode_text(lm.tokenizer(data.captions), normalize=True)
    return ecif.EmbeddingSet(x.numpy(), y.numpy(), logit_scale=lm.logit_scale)


@pytest.mark.parametrize("seed", [0, 1])
def test_without_validation_an_untrusted_split_is_left_to_the_probes(seed):
    # digits the tiny CLIP (trained on shapes) cannot read, 20% shuffled captions, no
    # validation set: the mixture finds a group of about 45% that is not the noise
    data = ecif.datasets.digits(1400, seed=seed, noise=0.2, noise_kind="shuffle")
    aud = ecif.Auditor(_tiny_clip_embed(data), None, ecif.AuditArgs(seed=seed))
    table = aud.run()
    bad = data.frame["is_corrupted"].to_numpy()
    combination = table.attrs["combination"]
    assert combination["probe_weights"]["alone_because"] == "split not trusted, no validation set"
    assert combination["probe_weights"]["parts"] == [PROBES_ONLY]
    text = describe_combination(combination)
    assert "without a validation set" in text
    # the signals are named by the table's columns: this audit has no influence column
    assert table["influence"].isna().all() and "self_influence" in text
    assert "influence" not in text.replace("self_influence", "")

    kept = _recombined(  # the same cleaned probes, plus the hedged mixture
        aud, table, lambda mix, sus: hedged_score(mix, sus, mix.log_odds(sus))[0], drop=0.2
    )
    ap, ap_kept, ap_loss = _average_precisions(bad, table, kept)
    print(seed, f"AP {ap:.3f}, with the mixture kept {ap_kept:.3f}, pair_loss {ap_loss:.3f}")
    # measured: 0.930 / 0.915 / 0.934 (seed 0), 0.902 / 0.885 / 0.913 (seed 1)
    assert ap > ap_kept + 0.008
    assert ap > ap_loss - 0.02


def test_without_validation_a_clear_35_percent_split_is_kept(monkeypatch):
    # 35% template captions, CLIP-like, no validation set: the mixture's groups are clearly
    # apart, but 35% is above the count the audit trusts without probes. Template captions
    # recur, so they bend the head little: the probes' weights alone (bounded at 0) cannot
    # use that, the mixture's split can.
    x, y, frame = ecif.datasets.concept_pairs(2000, 32, 0.35, "boilerplate", seed=0)
    aud = ecif.Auditor(ecif.EmbeddingSet(x, y, logit_scale=100.0), None, ecif.AuditArgs(seed=0))
    table = aud.run()
    bad = frame["is_corrupted"].to_numpy()
    combination = table.attrs["combination"]
    assert combination["valley"] >= CLEAR_VALLEY and combination["weights"][1] > MAX_RATE
    assert combination["probe_weights"]["parts"] != [PROBES_ONLY]  # the split is kept

    monkeypatch.setattr(misalign, "split_trusted", lambda rate, separation, valley: rate.reliable)
    count_only = misalign.misalign_scores(table, "auto", aud.heads[0].n_norm, aud.probes)[0]
    ap, ap_count, ap_loss = _average_precisions(bad, table, count_only)
    print(f"AP {ap:.3f}, split trusted by its count only {ap_count:.3f}, pair_loss {ap_loss:.3f}")
    # measured: 0.996 / 0.948 / 0.948
    assert ap > ap_count + 0.02
    assert ap > ap_loss + 0.02
