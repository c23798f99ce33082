"""A validation set that holds noise is measured and said (``ecif.audit.validation_noise``):
the estimate against planted shares, the warning in the API, audit.json and the CLI."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

import ecif
from ecif.audit.probes import held_out_clean
from ecif.audit.validation_noise import ValidationNoise, validation_noise
from ecif.cli import main


def _twin_scores(rho: float, seed: int = 0, pi: float = 0.2):
    """Scores of a twin's rows where the truth is planted: clean pairs N(0, 1), noisy pairs
    and probes N(2.5, 1); real rows a share ``pi`` noisy, held validation rows ``rho``."""
    g = np.random.default_rng(seed)
    n_real, n_probe, n_val = 4000, 800, 1000
    real = g.normal(0.0, 1.0, n_real) + 2.5 * (g.random(n_real) < pi)
    val = g.normal(0.0, 1.0, n_val) + 2.5 * (np.arange(n_val) < round(rho * n_val))
    probe = g.normal(2.5, 1.0, n_probe)
    score = np.concatenate([real, probe, val])
    is_probe = np.r_[np.zeros(n_real), np.ones(n_probe), np.zeros(n_val)].astype(bool)
    is_clean = np.r_[np.zeros(n_real + n_probe), np.ones(n_val)].astype(bool)
    return score, is_probe, is_clean


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.3])
def test_the_estimate_reads_the_planted_share_off_the_twins_ranks(rho):
    score, is_probe, is_clean = _twin_scores(rho)
    found = validation_noise(score, is_probe, is_clean)
    assert abs(found.rate - rho) < 0.05, found
    assert found.low <= rho + 0.01 and found.high >= rho - 0.01  # the interval covers it
    assert found.noisy == (rho > 0)
    assert found.held == is_clean.sum()
    # the training rows outrank clean validation rows, and not ones as noisy as they are
    assert (found.training_over_validation > 0.55) == (rho == 0.0)


def test_it_warns_only_when_the_interval_clears_its_floor():
    """The two clean sets that an interval merely above 0 flagged had lower ends of 0.002 and
    0.009 (held-out geometries): those stay quiet; an estimate under 5% does too."""
    assert not ValidationNoise(0.063, 0.009, 0.12, 250, 0.61).noisy
    assert ValidationNoise(0.063, 0.02, 0.12, 250, 0.61).noisy
    assert not ValidationNoise(0.045, 0.03, 0.08, 250, 0.55).noisy


def test_no_estimate_where_the_probes_do_not_outrank_the_real_rows():
    score, is_probe, is_clean = _twin_scores(0.2)
    score[is_probe] = np.random.default_rng(1).normal(0.0, 1.0, is_probe.sum())  # like clean
    assert validation_noise(score, is_probe, is_clean) is None
    assert validation_noise(score, is_probe, np.zeros_like(is_clean)) is None  # none held


def _concept_sets(val_noise: float, seed: int = 0):
    x, y, frame = ecif.datasets.concept_pairs(1200, 32, 0.2, "shuffle", seed=seed)
    xv, yv, vframe = ecif.datasets.concept_pairs(400, 32, val_noise, "shuffle", seed=seed + 99)
    meta = pd.DataFrame({"caption": frame["caption"].to_numpy()})
    train = ecif.EmbeddingSet(x, y, ids=frame["key"].to_numpy(), metadata=meta, logit_scale=100.0)
    return train, ecif.EmbeddingSet(xv, yv, logit_scale=100.0), vframe["is_corrupted"].to_numpy()


def test_a_validation_set_cut_from_the_noisy_data_warns_and_a_clean_one_does_not():
    train, val, corrupted = _concept_sets(0.2)
    with pytest.warns(ecif.NoisyValidationWarning, match="the validation set looks noisy"):
        table = ecif.Auditor(train, val).run()
    found = table.attrs["combination"]["validation_noise"]
    held, _ = held_out_clean(val, 0)  # the pairs the twin held: their planted share
    truth = corrupted[held].mean()
    assert 0.1 < truth < 0.3 and abs(found["rate"] - truth) < 0.1, (found, truth)
    assert found["noisy"] and found["held"] == len(held)
    assert any("looks noisy" in w for w in table.attrs["warnings"])
    clean_train, clean_val, _ = _concept_sets(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ecif.NoisyValidationWarning)
        table = ecif.Auditor(clean_train, clean_val).run()
    found = table.attrs["combination"]["validation_noise"]
    # the larger of two kinds' estimates: clean sets read up to 8% (benchmarks/README.md)
    assert found["rate"] < 0.08 and not found["noisy"]
    assert not any("looks noisy" in w for w in table.attrs["warnings"])


def test_the_cli_says_it_once_and_records_it(tmp_path, capsys):
    train, val, _ = _concept_sets(0.2)
    train.save(tmp_path / "train")
    val.save(tmp_path / "val")
    out = tmp_path / "audit"
    argv = ["score", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "-o", str(out)]
    assert main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    info = json.loads((out / "audit.json").read_text())
    (said,) = [w for w in info["warnings"] if "looks noisy" in w]
    assert captured.err.count(said) == 1, captured.err
    assert "NoisyValidationWarning" not in captured.err  # the summary's line, not Python's
    found = info["combination"]["validation_noise"]
    assert f"validation pairs: about {found['rate']:.0%} look noisy" in captured.out


def _twin_with_three_probe_kinds(rho: float, seed: int = 0):
    """As ``_twin_scores``, but the probes planted as the twin plants them, a third each:
    shuffled captions and generic ones (both scoring like the noise) and nearest-image
    captions that score like clean pairs (as on a continuous latent with no classes)."""
    score, is_probe, is_clean = _twin_scores(rho, seed)
    kinds = np.full(len(score), "", dtype=object)
    thirds = np.array_split(np.flatnonzero(is_probe), 3)
    for rows, kind in zip(thirds, ("shuffle", "near", "generic")):
        kinds[rows] = kind
    score[thirds[1]] = np.random.default_rng(seed + 7).normal(0.3, 1.0, len(thirds[1]))
    return score, is_probe, is_clean, kinds


@pytest.mark.parametrize("rho", [0.0, 0.2])
def test_each_kind_of_probe_alone_reads_a_clean_set_as_clean_where_the_pool_does_not(rho):
    score, is_probe, is_clean, kinds = _twin_with_three_probe_kinds(rho)
    pooled = validation_noise(score, is_probe, is_clean)
    if rho == 0.0:  # why: probes that score like clean pairs overcount the training noise
        assert pooled.rate > 0.05 and pooled.noisy
    found = validation_noise(score, is_probe, is_clean, kinds=kinds)
    assert found.probes in ("shuffle", "generic") and pooled.probes == "all"
    assert abs(found.rate - rho) < 0.05 and found.noisy == (rho > 0), found
    for kind in ("shuffle", "generic"):  # the larger of the two kinds' own estimates
        alone = ~is_probe | (kinds == kind)
        own = validation_noise(score[alone], is_probe[alone], is_clean[alone])
        assert found.rate >= own.rate - 1e-12
    few = kinds.copy()  # too few of each kind to read alone (10): all probes together
    few[np.flatnonzero(kinds == "shuffle")[10:]] = "near"
    few[np.flatnonzero(kinds == "generic")[10:]] = "near"
    assert validation_noise(score, is_probe, is_clean, kinds=few).rate == pooled.rate


def test_a_clean_validation_set_on_a_continuous_latent_does_not_warn():
    """The audit that warned before (latent_aligned, 20% shuffled captions, seed 0: the
    probes, nearest-image ones included, read 34% of the training pairs as noise and the
    clean validation set as 6% noisy, interval 4%-9%)."""
    x, y, _ = ecif.datasets.latent_pairs("latent_aligned", "shuffle", 0.2, 0, 2000)
    vx, vy, _ = ecif.datasets.latent_pairs("latent_aligned", "shuffle", 0.0, 1, 500)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ecif.NoisyValidationWarning)
        table = ecif.Auditor(ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(vx, vy)).run()
    found = table.attrs["combination"]["validation_noise"]
    assert found["probes"] in ("shuffle", "generic") and not found["noisy"], found
    assert found["rate"] < 0.03, found
