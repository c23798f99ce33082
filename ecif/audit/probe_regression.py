"""The planted probes' logistic regression: how much each signal says, learnt from labelled
misalignment planted in a twin audit (``ecif.audit.probes``); ``ecif.audit.combine`` adds the
features it weighs to the mixture's score. Pure numpy, no I/O."""

from __future__ import annotations

import numpy as np

__all__ = ["cleaned_probe_direction", "probe_direction"]


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
    f: np.ndarray, t: np.ndarray, l2: float, iters: int
) -> tuple[np.ndarray, float, float]:
    """Newton's method for ``probe_direction``'s unbounded objective: weights, bias and the
    objective's value (``f`` may have no columns: the bias alone)."""
    x = np.column_stack([f, np.ones(len(f))])
    pen = np.r_[np.full(f.shape[1], l2), 0.0]
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
