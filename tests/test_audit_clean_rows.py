"""Validation pairs held in the twin audit as known-clean rows: the probes' direction is
corrected by the twin's real rows against them (positive-unlabelled learning). The regression
is checked against scipy's optimiser, the correction against the direction that planted
features make optimal, and the held pairs against a head fit by hand on the other half."""

import json

import numpy as np
import pytest

import ecif
from ecif.audit import probe_regression
from ecif.audit.combination_text import describe_combination
from ecif.audit.probe_regression import _prior_logistic, contrast_direction
from ecif.audit.probes import held_out_clean
from ecif.audit.selection import make_probes
from ecif.engine.batches import make_partition


def _planted(seed, shift):
    # clean rows and the real rows' clean part: N(0, I); the real noise (20%) is shifted by
    # ``shift``; the probes' direction says feature 0, which the real noise does not share
    g = np.random.default_rng(seed)
    real = g.standard_normal((3000, 3))
    noisy = g.random(3000) < 0.2
    real[noisy] += shift
    clean = g.standard_normal((800, 3))
    f = np.vstack([real, clean])
    is_real = np.r_[np.ones(3000, bool), np.zeros(800, bool)]
    return f, is_real


def test_contrast_turns_the_probes_direction_to_the_noise_this_set_has():
    f, is_real = _planted(0, np.array([0.0, 0.0, 2.0]))
    prior = np.array([1.0, 0.0, 0.0])
    w, lam = contrast_direction(f, is_real, prior)
    # N(0, I) against N(0, I) shifted along e2: the density ratio rises along e2 alone
    assert np.isfinite(lam)
    assert w[2] / np.linalg.norm(w) > 0.95


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrast_keeps_the_probes_direction_when_real_and_clean_rows_agree(seed):
    f, is_real = _planted(seed, np.zeros(3))  # no noise to see: nothing to correct
    prior = np.array([0.7, 0.0, 0.3])
    w, lam = contrast_direction(f, is_real, prior)
    assert lam == np.inf
    np.testing.assert_allclose(w / np.linalg.norm(w), prior / np.linalg.norm(prior), atol=1e-9)


def test_the_corrected_regression_is_the_penalised_optimum():
    from scipy.optimize import minimize

    f, is_real = _planted(3, np.array([0.5, 0.0, 1.0]))
    prior, lam = np.array([1.0, 0.5, 0.0]), 0.1
    t = is_real.astype(float)

    def objective(v):  # a (nearly free) on f @ prior, v penalised by lam, bias free
        z = v[0] * (f @ prior) + f @ v[1:4] + v[4]
        return np.mean(np.logaddexp(0.0, z) - t * z) + 0.5 * (
            1e-8 * v[0] ** 2 + lam * v[1:4] @ v[1:4]
        )

    ref = minimize(objective, np.zeros(5), method="BFGS", options={"gtol": 1e-10}).x
    w, bias = _prior_logistic(f, t, prior, lam, 50)
    np.testing.assert_allclose(w, ref[0] * prior + ref[1:4], atol=1e-5)
    assert bias == pytest.approx(ref[4], abs=1e-5)


def test_an_unsure_gain_keeps_the_probes_direction(monkeypatch):
    f, is_real = _planted(4, np.array([0.0, 0.0, 2.0]))
    prior = np.array([1.0, 0.0, 0.0])
    monkeypatch.setattr(probe_regression, "CONTRAST_MIN_Z", 1e9)
    w, lam = contrast_direction(f, is_real, prior)
    assert lam == np.inf and w[1] == w[2] == 0.0


def test_held_out_clean_halves_the_validation_set():
    x, y, _ = ecif.datasets.concept_pairs(300, 16, 0.0, seed=1)
    val = ecif.EmbeddingSet(x, y)
    held, rest = held_out_clean(val, seed=7)
    assert len(held) == 150 and len(rest) == 150
    np.testing.assert_array_equal(held, held_out_clean(val, seed=7)[0])  # seeded
    kept = {tuple(np.round(r, 6)) for r in np.asarray(rest.image)}
    assert not kept & {tuple(np.round(r, 6)) for r in x[held]}  # disjoint halves
    small = ecif.EmbeddingSet(x[:59], y[:59])
    assert held_out_clean(small, 0) == (None, small)  # 29 would be held: too few
    assert held_out_clean(None, 0) == (None, None)


def _pair_losses(m, scale, x, y, partition):
    out = np.full(len(x), np.nan)
    for b in partition.index:
        b = b[b >= 0]
        s = scale * (x[b] @ m) @ y[b].T
        rows = s - np.logaddexp.reduce(s, axis=1, keepdims=True)
        cols = s - np.logaddexp.reduce(s, axis=0, keepdims=True)
        out[b] = -np.diag(rows) - np.diag(cols)
    return out


def test_the_twin_holds_half_the_validation_pairs_new_to_its_trusted_head(one_torch_thread):
    x, y, _ = ecif.datasets.concept_pairs(600, 16, 0.2, "shuffle", seed=5)
    xv, yv, _ = ecif.datasets.concept_pairs(200, 16, 0.0, seed=6)
    train, val = ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)
    args = ecif.AuditArgs(batch_size=64, probes=0.1)
    aud = ecif.Auditor(train, val, args)
    table = aud.run()
    probes = aud.probes
    assert probes.is_clean.sum() == 100 and probes.is_probe.sum() == 60
    assert not (probes.is_clean & probes.is_probe).any()
    record = table.attrs["combination"]["probe_weights"]
    assert record["clean"] == 100 and record["rows"] == 660 and "penalty" in record
    assert "told from 100 held-out validation pairs" in describe_combination(
        table.attrs["combination"]
    )
    json.dumps(table.attrs["combination"], allow_nan=False)  # audit.json stays strict JSON

    # the held pairs' trusted_loss in the twin: under a head fit on the other half alone,
    # in the twin's batches (recomputed here by hand)
    held, rest = held_out_clean(val, args.seed)
    head = aud.fit_head(rest)
    px, py, _ = make_probes(x, y, args.probes, args.seed)  # the twin's rows, in its order
    twin_x, twin_y = np.vstack([x, px, xv[held]]), np.vstack([y, py, yv[held]])
    part = make_partition(len(twin_x), args.batch_size, args.seed)
    by_hand = _pair_losses(head.m.double().numpy(), head.logit_scale, twin_x, twin_y, part)
    got = probes.suspicions["trusted_loss"][probes.is_clean]
    np.testing.assert_allclose(got, by_hand[probes.is_clean], rtol=1e-4)
    # not the audit's own trusted head (fit on every validation pair, these included)
    own = aud.trusted
    seen = _pair_losses(own.m.double().numpy(), own.logit_scale, twin_x, twin_y, part)
    assert np.median(seen[probes.is_clean]) < np.median(got) - 0.05
