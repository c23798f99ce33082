"""The planted probes' logistic regression: how much each signal says, learnt from labelled
misalignment planted in a twin audit (``ecif.audit.probes``), corrected by the twin's real rows
against validation pairs it holds as known-clean rows; ``ecif.audit.combine`` adds the features
it weighs to the mixture's score. Pure numpy, no I/O."""

from __future__ import annotations

import numpy as np

__all__ = ["cleaned_probe_direction", "contrast_direction", "probe_direction"]

# the contrast's penalties on leaving the probes' direction, chosen among by cross-validation
# (inf: the probes' direction, rescaled); 5 folds over the real and clean rows
CONTRAST_PENALTIES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, np.inf)
CONTRAST_FOLDS = 5
CONTRAST_MIN_Z = 1.0  # held-out gain over the probes' direction: at least one standard error


def probe_direction(
    features: np.ndarray,
    is_probe: np.ndarray,
    l2: float = 1e-2,
    iters: int = 50,
    nonnegative: bool = True,
) -> tuple[np.ndarray, float]:
    """Weights and bias of the L2-penalised logistic regression of planted probe vs the rest:
    minimises mean log-loss + l2/2 |w|^2 (bias unpenalised), with every weight >= 0 when
    ``nonnegative``. Why the bound: every feature is a suspicion (larger = more suspect), so
    a negative weight would rank a pair as less suspect for looking worse on that signal. The
    planted kinds can ask for one that the set's own noise does not: generic captions,
    planted on many images, bend the head little, and gave self-influence a weight of -1.2
    where shuffled captions at 35% asked for +0.4 (benchmarks/README.md). The bounded
    optimum is exact: the best of the unbounded fits on each subset of the features whose
    weights all come out >= 0 (on its support the bounded optimum is that subset's fit)."""
    f = np.asarray(features, dtype=np.float64)
    t = np.asarray(is_probe, dtype=np.float64)
    k = f.shape[1]
    w, bias, _ = _penalised_logistic(f, t, l2, iters)
    if not nonnegative or (w >= 0).all():  # an unbounded optimum inside the bound is its own
        return w, bias
    best = (np.inf, np.zeros(k), 0.0)
    for mask in range(2**k - 1):  # a handful of signals: every smaller support
        cols = [j for j in range(k) if mask >> j & 1]
        w, bias, loss = _penalised_logistic(f[:, cols], t, l2, iters)
        if (w >= 0).all() and loss < best[0]:
            full = np.zeros(k)
            full[cols] = w
            best = (loss, full, bias)
    return best[1], best[2]


def _penalised_logistic(
    f: np.ndarray, t: np.ndarray, l2: float | np.ndarray, iters: int
) -> tuple[np.ndarray, float, float]:
    """Newton's method for ``probe_direction``'s unbounded objective: weights, bias and the
    objective's value (``f`` may have no columns: the bias alone; ``l2`` may be one penalty
    per column)."""
    x = np.column_stack([f, np.ones(len(f))])
    pen = np.r_[np.broadcast_to(np.asarray(l2, dtype=np.float64), f.shape[1]), 0.0]
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 0.5 * (1.0 + np.tanh(0.5 * (x @ w)))  # the logistic, without overflow
        grad = x.T @ (p - t) / len(t) + pen * w
        hess = (x * (p * (1.0 - p))[:, None]).T @ x / len(t) + np.diag(pen) + 1e-12 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    z = x @ w
    loss = float(np.mean(np.logaddexp(0.0, z) - t * z) + 0.5 * (pen * w**2).sum())
    return w[:-1], float(w[-1]), loss


def cleaned_probe_direction(
    features: np.ndarray, is_probe: np.ndarray, drop: float
) -> tuple[np.ndarray, float, int]:
    """``probe_direction``, refit without the ``drop`` fraction of real rows that its first
    fit ranks most suspect; also returns how many rows were left out. Why: the twin's real
    rows hold the set's own noise, labelled 'rest' (positive-unlabelled data), so the first
    fit also learns to tell the planted kinds from the real noise: where the real noise lies
    further out than the probes on a signal, that signal loses weight it should have."""
    probe = np.asarray(is_probe, dtype=bool)
    w, bias = probe_direction(features, probe)
    if drop <= 0:
        return w, bias, 0
    lin = features @ w
    keep = probe | (lin < np.quantile(lin[~probe], 1.0 - drop))
    w, bias = probe_direction(features[keep], probe[keep])
    return w, bias, int((~keep).sum())


def contrast_direction(
    features: np.ndarray, is_real: np.ndarray, prior: np.ndarray, iters: int = 50
) -> tuple[np.ndarray, float]:
    """The probes' direction ``prior`` corrected by the twin's real rows (``is_real``) against
    known-clean rows (the rest: validation pairs the twin trained on as it did on the real
    ones). The real rows are the clean distribution plus the set's own noise, the clean rows
    the clean distribution alone, so the logistic regression of real vs clean ranks by the
    noise's density ratio (positive-unlabelled learning), on the noise this set has, not
    only the kinds planted. It is weak where the noise is rare: the regression is of
    ``[F prior, F]``, the first coefficient free, the others penalised by ``lam``, chosen by
    cross-validated log-loss among ``CONTRAST_PENALTIES``; inf keeps the probes' direction.
    Returns w = a prior + v with negative entries set to 0 (the probes' bound), and ``lam``.
    Why: planted probes are single copies, so they say little about a swap that recurs,
    which the trusted head sees (long-tailed classes: AP +0.021, benchmarks/README.md)."""
    f = np.asarray(features, dtype=np.float64)
    t = np.asarray(is_real, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    fold = np.random.default_rng(0).permutation(len(t)) % CONTRAST_FOLDS
    losses = np.zeros((len(CONTRAST_PENALTIES), len(t)))
    for i, lam in enumerate(CONTRAST_PENALTIES):
        for k in range(CONTRAST_FOLDS):
            fit, held = fold != k, fold == k
            w, bias = _prior_logistic(f[fit], t[fit], prior, lam, iters)
            z = f[held] @ w + bias
            losses[i, held] = np.logaddexp(0.0, z) - t[held] * z
    best = int(np.argmin(losses.sum(1)))
    gain = losses[-1] - losses[best]  # per row, against the probes' direction (inf)
    sure = gain.mean() > CONTRAST_MIN_Z * gain.std() / np.sqrt(len(gain))
    lam = CONTRAST_PENALTIES[best] if sure else np.inf
    w, _ = _prior_logistic(f, t, prior, lam, iters)
    w = np.maximum(w, 0.0)
    return (w if (w > 0).any() else prior.copy()), float(lam)


def _prior_logistic(
    f: np.ndarray, t: np.ndarray, prior: np.ndarray, lam: float, iters: int
) -> tuple[np.ndarray, float]:
    """Weights a prior + v and bias of the logistic regression on ``[f prior, f]`` with ``v``
    penalised by ``lam`` (inf: v = 0); a is all but free (1e-8: a prior of zeros)."""
    x = (f @ prior)[:, None] if np.isinf(lam) else np.column_stack([f @ prior, f])
    pen = np.r_[1e-8, np.full(x.shape[1] - 1, lam)]
    coef, bias, _ = _penalised_logistic(x, t, pen, iters)
    v = np.zeros(len(prior)) if np.isinf(lam) else coef[1:]
    return coef[0] * prior + v, bias
