"""Signals weighted by planted probes (a twin audit): the regression is sklearn's, the audit's
own head and signals are untouched, the weighting recovers what the mixture misses on weak
signals, and scored shards get the same weights as an in-memory audit."""

import json

import numpy as np
import pandas as pd
import pytest

import ecif
from ecif.audit.combination_text import describe_combination
from ecif.audit.metrics import average_precision
from ecif.audit.probe_regression import probe_direction
from ecif.audit.shards import load_training_set, score_shards
from ecif.data import layout


def test_probe_direction_is_sklearns_penalised_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    g = np.random.default_rng(0)
    n, l2 = 600, 1e-2
    t = g.random(n) < 0.15
    f = g.standard_normal((n, 3)) + np.outer(t, [1.5, 0.3, -0.5])
    w, b = probe_direction(f, t, l2=l2, nonnegative=False)
    # sklearn: 1/2 |w|^2 + C sum log-loss  ==  n C (mean log-loss + |w|^2 / (2 n C))
    ref = LogisticRegression(C=1.0 / (l2 * n), tol=1e-12, max_iter=10_000).fit(f, t)
    np.testing.assert_allclose(w, ref.coef_[0], rtol=1e-5, atol=1e-7)
    assert b == pytest.approx(ref.intercept_[0], abs=1e-6)


def test_bounded_probe_direction_is_the_bounded_optimum():
    from scipy.optimize import minimize

    # feature 2 is lower for probes (a signal the planted kind does not share): its bounded
    # weight is 0, and the others are refit without it, not just clipped
    g = np.random.default_rng(1)
    n, l2 = 800, 1e-2
    t = g.random(n) < 0.15
    f = g.standard_normal((n, 3)) + np.outer(t, [1.5, 0.3, -0.8])
    f[:, 1] += 0.5 * f[:, 2]  # correlated with the dropped feature

    def objective(v):
        z = f @ v[:3] + v[3]
        return np.mean(np.logaddexp(0.0, z) - t * z) + 0.5 * l2 * v[:3] @ v[:3]

    bounds = [(0, None)] * 3 + [(None, None)]
    ref = minimize(objective, np.zeros(4), method="L-BFGS-B", bounds=bounds, tol=1e-14)
    w, b = probe_direction(f, t, l2=l2)
    assert w[2] == 0.0 and (w >= 0).all()
    np.testing.assert_allclose(np.r_[w, b], ref.x, atol=1e-4)
    assert objective(np.r_[w, b]) <= ref.fun + 1e-10
    signed, _ = probe_direction(f, t, l2=l2, nonnegative=False)
    assert signed[2] < 0 and abs(signed[1] - w[1]) > 1e-3  # not the signed fit clipped


def _weak_signals(seed):
    # narrow CLIP-like embeddings (d = 16), 20% shuffled captions: every signal is weak and the
    # mixture's split is not trusted; the pair's own loss is the best single signal
    x, y, frame = ecif.datasets.concept_pairs(2000, 16, 0.2, "shuffle", seed=seed)
    xv, yv, _ = ecif.datasets.concept_pairs(500, 16, 0.0, seed=seed + 10_000)
    train = ecif.EmbeddingSet(x, y, logit_scale=100.0)
    return train, ecif.EmbeddingSet(xv, yv, logit_scale=100.0), frame["is_corrupted"].to_numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_probe_weights_recover_what_the_mixture_misses(seed, one_torch_thread):
    train, val, bad = _weak_signals(seed)
    with_probes = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed))
    table = with_probes.run()
    alone = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed, probes=0.0))
    table0 = alone.run()

    # the twin audit leaves the audit's own head and signals as they were
    np.testing.assert_array_equal(with_probes.heads[0].m.numpy(), alone.heads[0].m.numpy())
    for col in ("influence", "pair_loss", "clip_score"):
        np.testing.assert_array_equal(table[col].to_numpy(), table0[col].to_numpy())
    record = table.attrs["combination"]["probe_weights"]
    assert record["probes"] == 200 and record["rows"] == 2200  # 10% planted, none dropped
    assert "probe_weights" not in table0.attrs["combination"]
    assert with_probes.probes.is_probe.sum() == 200

    # here the mixture's density has one mode (no group apart): the probes' weights decide alone
    assert record["parts"] == ["probe_weighted_features"]
    assert "alone" in describe_combination(table.attrs["combination"])  # what the CLI/app say
    assert "UNRELIABLE" in table.attrs["threshold"]

    ap = average_precision(bad, table["misalign_score"].to_numpy())
    ap0 = average_precision(bad, table0["misalign_score"].to_numpy())
    ap_loss = average_precision(bad, table["pair_loss"].to_numpy())
    print(seed, f"AP with probes {ap:.3f}, mixture alone {ap0:.3f}, pair_loss alone {ap_loss:.3f}")
    # measured with five signals (knn_disagreement the fifth): 0.619 / 0.523 / 0.624 (seed 0),
    # 0.636 / 0.502 / 0.624 (seed 1); with four: 0.629 / 0.496 and 0.650 / 0.490; with the
    # mixture's log-odds added as well (before the mode check): 0.598 and 0.599
    assert ap > ap0 + 0.08
    assert ap > ap_loss - 0.01  # at its best single input, the pair's loss


def test_scored_shards_get_the_in_memory_audits_probe_weights(tmp_path):
    x, y, frame = ecif.datasets.concept_pairs(360, 16, 0.2, "shuffle", seed=3)
    xv, yv, _ = ecif.datasets.concept_pairs(200, 16, 0.0, seed=4)
    folder = tmp_path / "emb"
    for k in range(3):
        sl = slice(k * 120, (k + 1) * 120)
        meta = pd.DataFrame(
            {"key": [f"p{k}-{i}" for i in range(120)], "caption": "c", "status": "ok"}
        )
        layout.write_part(folder, k, x[sl], y[sl], meta, {"source": f"{k:05d}.parquet"})
    layout.write_manifest(
        folder,
        {"id_column": "key", "parts": [{"index": k, "source": f"{k:05d}"} for k in range(3)]},
    )
    val = ecif.EmbeddingSet(xv, yv)
    args = ecif.AuditArgs(batch_size=32)
    score_shards(folder, tmp_path / "audit", val, args=args, log=lambda s: None)
    shards = pd.concat(
        [pd.read_parquet(f) for f in sorted((tmp_path / "audit" / "scores").glob("*.parquet"))]
    )
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["combination"]["probe_weights"]["probes"] == 36

    # in memory, with the same shard-local batches
    memory = ecif.Auditor(load_training_set(folder), val, args).run()
    np.testing.assert_allclose(
        shards["misalign_score"].to_numpy(), memory["misalign_score"].to_numpy(), atol=1e-4
    )
    assert np.allclose(
        audit["combination"]["probe_weights"]["weights"],
        memory.attrs["combination"]["probe_weights"]["weights"],
    )
