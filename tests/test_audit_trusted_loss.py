"""trusted_loss: each training pair's loss under a head fit on the validation pairs alone."""

import numpy as np
import torch

import ecif
from ecif.audit.metrics import average_precision


def _sets(n=400, n_val=200, d=16, kind="confusable", seed=0):
    x, y, frame = ecif.datasets.concept_pairs(n, d, 0.2, kind, seed=seed, geometry="aligned")
    xv, yv, _ = ecif.datasets.concept_pairs(n_val, d, 0.0, seed=seed + 1, geometry="aligned")
    train = ecif.EmbeddingSet(x, y, logit_scale=100.0)
    return train, ecif.EmbeddingSet(xv, yv, logit_scale=100.0), frame["is_corrupted"].to_numpy()


def _batch_losses(m, t, x, y):
    """Symmetric InfoNCE of each member of one batch under S = t x M y^T (float64 numpy)."""
    s = t * x @ m @ y.T
    row = s - s.max(1, keepdims=True)
    row = row - np.log(np.exp(row).sum(1, keepdims=True))
    col = s - s.max(0, keepdims=True)
    col = col - np.log(np.exp(col).sum(0, keepdims=True))
    return -(np.diag(row) + np.diag(col))


def test_trusted_loss_is_the_loss_under_a_head_at_the_validation_optimum():
    train, val, _ = _sets()
    aud = ecif.Auditor(train, val, ecif.AuditArgs(seed=0, probes=0.0, dtype="float64"))
    table = aud.run()
    trusted = aud.fit_trusted_head()
    m, t = trusted.m.numpy(), trusted.logit_scale
    # the head is at the stationary point of the VALIDATION objective (autograd, own batches)
    mt = torch.tensor(m, requires_grad=True)
    xv, yv = (torch.tensor(np.asarray(a), dtype=torch.float64) for a in (val.image, val.text))
    total = 0.0
    for rows in trusted.partition.index:
        rows = torch.tensor(rows[rows >= 0])
        s = t * xv[rows] @ mt @ yv[rows].T
        total = total - (s.log_softmax(1).diag() + s.log_softmax(0).diag()).sum()
    pull = 0.5 * trusted.lam * ((mt - trusted.m0) ** 2).sum()
    (grad,) = torch.autograd.grad(total / len(val) + pull, mt)
    assert grad.abs().max() < 1e-5
    # and trusted_loss is each training pair's loss under it, in the training head's batches
    x, y = np.asarray(train.image, np.float64), np.asarray(train.text, np.float64)
    want = np.full(len(train), np.nan)
    for rows in aud.heads[0].partition.index:
        rows = rows[rows >= 0]
        want[rows] = _batch_losses(m, t, x[rows], y[rows])
    np.testing.assert_allclose(table["trusted_loss"], want, rtol=1e-4, atol=1e-5)


def test_trusted_loss_sees_a_recurring_swap_the_training_head_learns():
    """Every pair of a class captioned with its near-miss class: the head fit on them learns
    the swap, so their own loss stays low; the head fit on the clean pairs never saw it."""
    aps = []
    for seed in (0, 1):
        train, val, labels = _sets(n=800, d=32, seed=seed)
        table = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed, probes=0.0)).run()
        trusted = average_precision(labels, table["trusted_loss"].to_numpy())
        own = average_precision(labels, table["pair_loss"].to_numpy())
        aps.append((trusted, own))
    print("AP trusted_loss vs pair_loss", np.round(aps, 3))
    assert all(trusted > own + 0.05 for trusted, own in aps)


def test_the_twin_audit_reuses_the_trusted_head_and_gets_what_a_refit_gets(monkeypatch):
    from ecif.audit import probes
    from ecif.audit.probes import probe_signals

    train, val, _ = _sets()
    fits_on_val = []
    fit_head = ecif.Auditor.fit_head

    def counting(self, data, *args, **kwargs):
        fits_on_val.append(data is val)
        return fit_head(self, data, *args, **kwargs)

    monkeypatch.setattr(ecif.Auditor, "fit_head", counting)
    # a twin without held validation pairs (test_audit_clean_rows: with them it fits its
    # trusted head on the other half, which the held pairs are new to)
    monkeypatch.setattr(probes, "MIN_CLEAN", 10**9)
    aud = ecif.Auditor(train, val, ecif.AuditArgs(seed=0))
    aud.run()
    assert aud.probes is not None and "trusted_loss" in aud.probes.suspicions
    assert sum(fits_on_val) == 1  # the audit's own trusted head, and no second fit in the twin
    reused = aud.probes.suspicions["trusted_loss"]
    aud.trusted = None  # the twin as it was before: its own fit on the same validation pairs
    refit = probe_signals(aud, aud.args.probes).suspicions["trusted_loss"]
    assert sum(fits_on_val) == 2
    np.testing.assert_allclose(reused, refit, rtol=1e-6, atol=1e-6)
