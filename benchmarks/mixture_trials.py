"""Trials of the mixture's shape, for ``bench_combine_trials.py`` (registered in its TRIALS).

On an encoder trained on the data (shapes, the demo) the default ranks below ``clip_score``
and negCLIPLoss, and the mixture alone ranks lowest of all: its suspects' component is
nearly rank one (eigenvalues 0.001-0.03 against 0.5 on one axis, every signal agreeing on
the plain noise), so its quadratic log-odds punishes a pair for lying slightly off that
line, and falls again beyond the suspects' mean. These trials change that shape; each keeps
the rest of the default (the count of the noise, the hedge, the probes) as it is.
"""

from __future__ import annotations

from unittest import mock

import numpy as np

from ecif.audit import combine, misalign
from ecif.audit.combine import _log_densities
from ecif.audit.misalign import misalign_scores


def _default(cell) -> np.ndarray:
    return misalign_scores(cell.table, "auto", float(cell.d["n_norm"]), cell.probes())[0]


def ranked_by(ranking):
    """A trial: the default with the mixture ranking pairs by ``ranking(mix, suspicions)``."""

    def run(cell) -> np.ndarray:
        with mock.patch.object(misalign, "mixture_ranking", ranking):
            return _default(cell)

    return run


def _log_odds(mix, suspicions, covs) -> np.ndarray:
    z = mix.features(suspicions)
    ok = np.isfinite(z).all(axis=1)
    out = np.full(len(z), np.nan)
    dens = _log_densities(z[ok], mix.weights, mix.means, covs)
    out[ok] = dens[:, 1] - dens[:, 0]
    return out


def linear(mix, suspicions) -> np.ndarray:
    """The shared-covariance (Fisher) log-odds: linear, so monotone along its direction."""
    pooled = (mix.weights[:, None, None] * mix.covs).sum(0)
    return _log_odds(mix, suspicions, np.stack([pooled, pooled]))


def ridged(eps: float):
    """The log-odds with ``eps`` (IQR units squared) added to both covariances."""
    return lambda mix, sus: _log_odds(mix, sus, mix.covs + eps * np.eye(mix.covs.shape[1]))


def ray_max(mix, suspicions) -> np.ndarray:
    """The largest log-odds on the segment from the bulk's mean to the pair (closed form:
    along it the log-odds is quadratic), so it never falls further out."""
    f = mix.features(suspicions)
    p_b, p_s = np.linalg.inv(mix.covs[0]), np.linalg.inv(mix.covs[1])
    u = f - mix.means[0]
    a = 0.5 * (np.einsum("ij,jk,ik->i", u, p_b, u) - np.einsum("ij,jk,ik->i", u, p_s, u))
    b = u @ (p_s @ (mix.means[1] - mix.means[0]))
    end = mix.log_odds(suspicions)
    start = end - a - b
    best = np.maximum(end, start)
    with np.errstate(divide="ignore", invalid="ignore"):
        peak = -b / (2 * a)
    inside = (a < 0) & (peak > 0) & (peak < 1)
    return np.where(inside, np.maximum(best, start - b * b / (4 * a)), best)


def em_ridge(eps: float):
    """A trial: EM itself with ``eps`` added to each covariance (the default adds 1e-6)."""

    def run(cell) -> np.ndarray:
        with mock.patch.object(combine, "COV_RIDGE", eps):
            return _default(cell)

    return run


def probes_alone(cell) -> np.ndarray:
    """The probes' weights alone, the mixture's score left out everywhere."""
    with mock.patch.object(misalign, "probes_alone", lambda *args: "trial"):
        return _default(cell)


MIXTURE_TRIALS = {
    "mixture ranks by its linear (shared-covariance) log-odds": ranked_by(linear),
    "mixture ranks by its largest log-odds on the way out": ranked_by(ray_max),
    "mixture ranks with covariances + 0.1": ranked_by(ridged(0.1)),
    "mixture fit with covariances + 0.1": em_ridge(0.1),
    "mixture fit with covariances + 0.03": em_ridge(0.03),
    "probes' weights alone": probes_alone,
}
