"""From several per-pair signals to the one ranking a user sees (``misalign_score``).

No single signal wins everywhere: the pretrained similarity (``clip_score``) is strong when the
encoder knows the domain, the pair's own loss under the head when a caption is plainly wrong,
ECIF's influence when the validation set says which pairs pull the head the wrong way. Each
signal becomes a suspicion (larger = more suspect), standardised robustly (median and
interquartile range), and its tails are made Gaussian: z -> c asinh(z / c) with c chosen so
the kurtosis is 3 (heavy-tailed signals are compressed, light-tailed ones left alone: a few
extreme pairs must not own the fit, and a flattened signal must not look like two groups).
The default combination is a two-component Gaussian mixture with full covariance over these
features, started from the top fifth by summed suspicion: one component for the bulk of the
pairs, one for the suspects; ``misalign_score`` is the log-odds of the suspect component. The
mixture weighs each signal by how well it separates a minority group on this data, with no
labels, and the same fit estimates the noise rate (the pairs with positive log-odds). When
that estimate is not trusted (components not apart, or suspects not a minority), the
mixture's weights are not either: the score then hedges, the standardised log-odds plus the
standardised equal-weight sum of the same features (``hedged_score``). When a twin audit
with planted probes ran (``ecif.audit.probes``), the score adds the features weighted by a
logistic regression of planted vs the rest, every weight >= 0 (``probe_weighted_score``,
``ecif.audit.probe_regression``): labels of the planted
kinds, on this data, for what the unsupervised fit cannot tell. A mixture whose density has
one mode (``SuspectMixture.valley``) found no group of suspects, only the bulk's shape: then
the probes' weights rank alone, and its noise rate is not trusted. Without a validation set
(``ecif.audit.misalign``), an untrusted mixture is left out the same way, and the regression
is refit without the real rows it ranks most suspect (``cleaned_probe_direction``).
``docs/math.md`` has the formulas; benchmarks/README.md the measurements.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from ecif.audit.probe_regression import (
    cleaned_probe_direction,
    contrast_direction,
    probe_direction,
)
from ecif.audit.thresholds import clearly_apart

SIGNALS = ("influence", "pair_loss", "clip_score")
# the LEMoN-style kNN consensus (``ecif.audit.baselines.lemon``): an audit's fifth signal, with
# ``trusted_loss``, when it has a validation set (every mode)
CONSENSUS = "knn_disagreement"
VALIDATED_SIGNALS = ("trusted_loss", CONSENSUS)
GAUSSIAN_KURTOSIS = 3.0
MIN_TAIL_SCALE = 0.5  # c at least half an IQR: asinh reshapes the tails, not the bulk
RIDGE_POINTS = 201  # where the mixture's density is evaluated between its means
COV_RIDGE = 1e-6  # added to each component's covariance in EM (larger lost: mixture_trials)
APART_ON_ONE = 1.0  # IQRs: how much more suspect on one signal a minority apart must be


def suspicion(name: str, values: np.ndarray, n_norm: float = 1.0) -> np.ndarray:
    """A signal oriented so that larger = more suspicious (float64; NaN stays NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if name == "influence":  # negative influence = removing the pair lowers validation loss
        return -v * n_norm
    if name in ("self_influence", "pair_loss", "trusted_loss", CONSENSUS):  # already oriented
        return v
    if name == "clip_score":
        return -v
    known = SIGNALS + ("self_influence", "trusted_loss", CONSENSUS)
    raise ValueError(f"unknown signal {name!r}; expected one of {known}")


@dataclass(frozen=True)
class Standardiser:
    """Median and interquartile range of one suspicion over the training set."""

    median: float
    scale: float

    @classmethod
    def of(cls, values: np.ndarray) -> Standardiser:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            return cls(0.0, 1.0)
        q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
        scale = q3 - q1
        if not scale > 0:  # a degenerate signal (constant): fall back to the spread
            scale = float(v.std()) or 1.0
        return cls(float(med), float(scale))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) - self.median) / self.scale


def weighted_sum(suspicions: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """sum_k w_k * z_k over standardised suspicions (signals with weight 0 are not read)."""
    out = None
    for name, w in weights.items():
        if w:
            term = w * Standardiser.of(suspicions[name])(suspicions[name])
            out = term if out is None else out + term
    if out is None:
        raise ValueError("all combination weights are 0")
    return out


@dataclass
class SuspectMixture:
    """Two Gaussians over tail-Gaussianised standardised suspicions; component 1 = suspects."""

    signals: tuple[str, ...]
    standardisers: tuple[Standardiser, ...]
    weights: np.ndarray  # (2,)
    means: np.ndarray  # (2, k)
    covs: np.ndarray  # (2, k, k)
    compress: tuple[float, ...]  # c per signal (inf: left linear)

    def features(self, suspicions: Mapping[str, np.ndarray]) -> np.ndarray:
        cols = zip(self.signals, self.standardisers, self.compress)
        return np.stack([_compress(st(suspicions[k]), c) for k, st, c in cols], axis=1)

    def log_odds(self, suspicions: Mapping[str, np.ndarray]) -> np.ndarray:
        """log P(suspect | signals) - log P(bulk | signals); NaN where a signal is NaN."""
        z = self.features(suspicions)
        ok = np.isfinite(z).all(axis=1)
        out = np.full(len(z), np.nan)
        dens = _log_densities(z[ok], self.weights, self.means, self.covs)
        out[ok] = dens[:, 1] - dens[:, 0]
        return out

    @property
    def separation(self) -> float:
        """Mahalanobis distance between the two means under the weighted pooled covariance."""
        pooled = (self.weights[:, None, None] * self.covs).sum(0)
        diff = self.means[1] - self.means[0]
        return float(np.sqrt(diff @ np.linalg.solve(pooled, diff)))

    @property
    def valley(self) -> float:
        """How deep the mixture's log-density dips between its two means, along the ridgeline
        x(a) = [(1-a) S_b^-1 + a S_s^-1]^-1 [(1-a) S_b^-1 mu_b + a S_s^-1 mu_s], a in [0, 1],
        on which every mode of a two-Gaussian mixture lies (Ray and Lindsay, 2005). 0: the
        density has one mode, so the suspects are no group apart; the fit has modelled the
        bulk's shape (its skew, its tails), and its log-odds orders the pairs along that."""
        p0, p1 = np.linalg.inv(self.covs[0]), np.linalg.inv(self.covs[1])
        a = np.linspace(0.0, 1.0, RIDGE_POINTS)
        pts = np.stack(
            [
                np.linalg.solve(
                    (1 - t) * p0 + t * p1, (1 - t) * p0 @ self.means[0] + t * p1 @ self.means[1]
                )
                for t in a
            ]
        )
        logp = _log_total(_log_densities(pts, self.weights, self.means, self.covs))
        left = np.maximum.accumulate(logp)  # the highest point on each side of each point
        right = np.maximum.accumulate(logp[::-1])[::-1]
        return float((np.minimum(left, right) - logp).max())

    def record(self) -> dict:
        """JSON-ready parameters (so the combination can be recomputed from audit.json)."""
        return {
            "kind": "mixture",
            "signals": list(self.signals),
            "standardisers": [[s.median, s.scale] for s in self.standardisers],
            "compress": [c if np.isfinite(c) else None for c in self.compress],
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covs": self.covs.tolist(),
            "separation": self.separation,
            "valley": self.valley,
        }


def hedged_score(
    mix: SuspectMixture, suspicions: Mapping[str, np.ndarray], log_odds: np.ndarray
) -> tuple[np.ndarray, dict]:
    """z(log_odds) + z(sum of the mixture's features), each z robust (median, IQR), and the
    record of both standardisers (``log_odds``: the mixture's, as the caller has it). For a mixture whose split is not trusted: on weakly
    separated signals EM can split the bulk along the signals' correlation instead of the
    noise (measured: AP 0.43 against 0.62 for the pair's loss alone), and the equal-weight
    sum cannot be fooled that way; the mixture keeps what it did learn."""
    total = mix.features(suspicions).sum(axis=1)
    parts = (Standardiser.of(log_odds), Standardiser.of(total))
    record = {
        "parts": ["log_odds", "feature_sum"],
        "standardisers": [[p.median, p.scale] for p in parts],
    }
    return parts[0](log_odds) + parts[1](total), record


def probe_weighted_score(
    mix: SuspectMixture,
    suspicions: Mapping[str, np.ndarray],
    score: np.ndarray,
    probe_suspicions: Mapping[str, np.ndarray],
    is_probe: np.ndarray,
    alone: bool = False,
    drop: float = 0.0,
    is_clean: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """z(score) + z(F w): the mixture's score plus the mixture's features weighted by how well
    they tell planted probes from the rest in a twin audit (``probe_suspicions``: that audit's
    signals, ``is_probe``: which of its rows were planted), and the record of both. The
    mixture sees the noise this set has but, on weak signals, cannot tell which signal carries
    it; the probes are labelled, but only of the kinds planted. Measured on 90 benchmark
    cell-seeds, the sum beat the mixture alone on every seed at both widths tried.
    ``is_clean``: the twin's rows that are validation pairs (known clean): then the probes
    are told from those, not from the real rows (which hold the set's own noise), and their
    direction is corrected by the real rows against the clean ones (``contrast_direction``).
    ``alone``: z(F w) only, for a mixture whose score has found no group to add.
    ``drop``: the fraction of the twin's real rows, most suspect under a first fit, left out
    of a second (``cleaned_probe_direction``; not used with clean rows)."""
    feats = mix.features(probe_suspicions)
    ok = np.isfinite(feats).all(axis=1)
    probe = np.asarray(is_probe, dtype=bool)[ok]
    clean = np.zeros(len(probe), bool) if is_clean is None else np.asarray(is_clean, bool)[ok]
    extra = {}
    if clean.any():
        told = probe | clean
        prior, bias = probe_direction(feats[ok][told], probe[told])
        real = ~told
        w, lam = contrast_direction(feats[ok][~probe], real[~probe], prior)
        penalty = lam if np.isfinite(lam) else None  # None: the real rows did not move it
        extra = {"clean": int(clean.sum()), "prior_weights": prior.tolist(), "penalty": penalty}
        dropped = 0
    else:
        w, bias, dropped = cleaned_probe_direction(feats[ok], probe, drop)
    total, parts = probe_sum(score, mix.features(suspicions) @ w, alone)
    record = {
        "signals": list(mix.signals),
        "weights": w.tolist(),
        "bias": bias,
        "probes": int(probe.sum()),
        "rows": int((~probe & ~clean).sum() + probe.sum()),
        "dropped": dropped,
        **extra,
        "parts": ["probe_weighted_features"] if alone else ["score", "probe_weighted_features"],
        "standardisers": [[q.median, q.scale] for q in parts],
    }
    return total, record


def probe_sum(
    score: np.ndarray, lin: np.ndarray, alone: bool
) -> tuple[np.ndarray, tuple[Standardiser, ...]]:
    """z(score) + z(lin), or z(lin) ``alone``, each z robust over these rows, and the
    standardisers: how ``probe_weighted_score`` adds the probe-weighted features ``lin`` to
    the mixture's score (and how the twin's rows are scored the same way)."""
    values = (lin,) if alone else (score, lin)
    parts = tuple(Standardiser.of(v) for v in values)
    total = parts[0](values[0])
    for part, v in zip(parts[1:], values[1:]):
        total = total + part(v)
    return total, parts


def fit_mixture(suspicions: Mapping[str, np.ndarray], iters: int = 300) -> SuspectMixture:
    """EM for two full-covariance Gaussians, started from the top fifth by summed suspicion
    (deterministic); the component with the larger summed mean is the suspects', unless the
    signals disagree on two groups clearly apart (``_group_apart_as_suspects``)."""
    signals = tuple(suspicions)
    stds = tuple(Standardiser.of(suspicions[k]) for k in signals)
    comp = tuple(gaussian_tail_scale(st(suspicions[k])) for k, st in zip(signals, stds))
    blank = SuspectMixture(signals, stds, np.ones(2), np.zeros((2, 1)), np.zeros((2, 1, 1)), comp)
    z = blank.features(suspicions)
    z = z[np.isfinite(z).all(axis=1)]
    n, k = z.shape
    if n < 4 * (k + 1):
        raise ValueError(f"a mixture over {k} signals needs at least {4 * (k + 1)} scored pairs")
    top = z.sum(1) >= np.quantile(z.sum(1), 0.8)
    weights, means, covs = _em(z, np.stack([~top, top], axis=1).astype(np.float64), iters)
    order = np.argsort(means.sum(1))  # bulk first, suspects second
    mix = SuspectMixture(signals, stds, weights[order], means[order], covs[order], comp)
    return _group_apart_as_suspects(mix)


def _group_apart_as_suspects(mix: SuspectMixture) -> SuspectMixture:
    """``mix`` with its components swapped when the larger summed suspicion named the majority
    the suspects, yet the two are clearly apart (``thresholds.clearly_apart``) and the
    minority is at least ``APART_ON_ONE`` more suspect on some signal: the signals disagree,
    and the group apart is the minority. Why: template captions recur, so they bend the head
    little (the lowest self-influence of all) while their loss is high; the two sums then
    differ by noise, and the bulk had been named the suspects (AP 0.11 on two seeds of a
    held-out geometry, benchmarks/README.md). A minority lower on every signal (a clean
    cluster, duplicates) stays the bulk."""
    minority_higher = (mix.means[0] - mix.means[1]).max()
    clear = clearly_apart(mix.separation, mix.valley)
    if mix.weights[1] > 0.5 and clear and minority_higher >= APART_ON_ONE:
        return replace(mix, weights=mix.weights[::-1], means=mix.means[::-1], covs=mix.covs[::-1])
    return mix


def gaussian_tail_scale(
    z: np.ndarray, target: float = GAUSSIAN_KURTOSIS, floor: float = MIN_TAIL_SCALE
) -> float:
    """The c at which c asinh(z / c) has a Gaussian's kurtosis (inf when z's tails are no
    heavier than a Gaussian's: such a signal is left as it is), but never below ``floor``.
    Why the floor: a small group far out (5% shuffled captions) is itself what makes the
    kurtosis large, and the c that flattens it (about 0.25 IQR, measured) turns the whole
    signal into nearly its logarithm and merges that group into the bulk. Bisection on log c."""
    z = np.asarray(z, dtype=np.float64)
    z = z[np.isfinite(z)]
    if len(z) < 4 or _kurtosis(z) <= target:
        return float("inf")
    if _kurtosis(_compress(z, floor)) > target:
        return float(floor)
    lo, hi = np.log(floor), np.log(1e3)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _kurtosis(_compress(z, float(np.exp(mid)))) > target:
            hi = mid
        else:
            lo = mid
    return float(np.exp(0.5 * (lo + hi)))


def _compress(z: np.ndarray, c: float) -> np.ndarray:
    return z if not np.isfinite(c) else c * np.arcsinh(z / c)


def _kurtosis(v: np.ndarray) -> float:
    d = v - v.mean()
    var = (d**2).mean()
    return float((d**4).mean() / var**2) if var > 0 else 0.0


def _em(z: np.ndarray, resp: np.ndarray, iters: int):
    """EM from initial responsibilities: (weights, means, covariances)."""
    n, k = z.shape
    ridge = COV_RIDGE * np.eye(k)
    last = -np.inf
    for _ in range(iters):
        nk = resp.sum(0) + 1e-12
        weights = nk / n
        means = (resp.T @ z) / nk[:, None]
        covs = np.stack(
            [
                ((resp[:, j, None] * (z - means[j])).T @ (z - means[j])) / nk[j] + ridge
                for j in (0, 1)
            ]
        )
        dens = _log_densities(z, weights, means, covs)
        total = _log_total(dens)
        resp = np.exp(dens - total[:, None])
        ll = float(total.mean())
        if ll - last < 1e-9 * max(1.0, abs(ll)):
            break
        last = ll
    return weights, means, covs


def _log_total(dens: np.ndarray) -> np.ndarray:
    """log sum_j exp(dens[:, j]): the mixture's log-density from its components', stably."""
    top = dens.max(1, keepdims=True)
    return top[:, 0] + np.log(np.exp(dens - top).sum(1))


def _log_densities(z: np.ndarray, weights, means, covs) -> np.ndarray:
    """log(w_j N(z | mu_j, S_j)) for both components: (n, 2)."""
    out = np.empty((len(z), 2))
    for j in (0, 1):
        chol = np.linalg.cholesky(covs[j])
        sol = np.linalg.solve(chol, (z - means[j]).T)
        logdet = 2.0 * np.log(np.diag(chol)).sum()
        out[:, j] = (
            np.log(weights[j] + 1e-300)
            - 0.5 * (sol**2).sum(0)
            - 0.5 * logdet
            - 0.5 * z.shape[1] * np.log(2 * np.pi)
        )
    return out
