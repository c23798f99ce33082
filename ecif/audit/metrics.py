"""Ranking metrics against ground truth, and the two-Gaussian mixture used for noise rates.

Pure numpy, so the demo, the benchmarks and the tests measure rankings the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties get average ranks)."""
    labels = np.asarray(labels, dtype=bool)
    r = pd.Series(scores).rank(method="average").to_numpy()
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    return float((r[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of a ranking (mean precision at each true positive)."""
    labels = np.asarray(labels, dtype=bool)[np.argsort(-np.asarray(scores), kind="stable")]
    hits = np.cumsum(labels)
    return (
        float((hits[labels] / (np.nonzero(labels)[0] + 1)).mean()) if labels.any() else float("nan")
    )


def precision_at_k(labels: np.ndarray, scores: np.ndarray, k: int | None = None) -> float:
    """Share of true positives among the ``k`` highest scores (default: as many as there are)."""
    labels = np.asarray(labels, dtype=bool)
    k = int(labels.sum()) if k is None else int(k)
    if k <= 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return float(labels[top].mean())


def ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {
        "auroc": auroc(labels, scores),
        "ap": average_precision(labels, scores),
        "p@k": precision_at_k(labels, scores),
    }


@dataclass
class Mixture:
    """A fitted two-component 1-D Gaussian mixture (index 1 = the upper component)."""

    weights: np.ndarray
    means: np.ndarray
    sds: np.ndarray

    def posterior_upper(self, s: np.ndarray) -> np.ndarray:
        dens = self.weights / self.sds * np.exp(-0.5 * ((s[:, None] - self.means) / self.sds) ** 2)
        return dens[:, 1] / np.maximum(dens.sum(1), 1e-300)

    @property
    def separation(self) -> float:
        """Distance of the means in pooled standard deviations."""
        pooled = np.sqrt((self.weights * self.sds**2).sum())
        return float((self.means[1] - self.means[0]) / max(pooled, 1e-300))


def two_gaussian_mixture(scores: np.ndarray, iters: int = 200) -> Mixture:
    """EM for two Gaussians, started at the 25th and 90th percentiles; sorted by mean."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) < 2:
        return Mixture(np.array([1.0, 0.0]), np.array([0.0, 0.0]), np.array([1.0, 1.0]))
    lo, hi = np.quantile(s, [0.25, 0.9])
    mu = np.array([lo, hi])
    sd = np.full(2, s.std() / 2 + 1e-12)
    w = np.array([0.8, 0.2])
    floor = 1e-9 * (s.std() + 1e-12)
    for _ in range(iters):
        dens = w / sd * np.exp(-0.5 * ((s[:, None] - mu) / sd) ** 2)
        resp = dens / np.maximum(dens.sum(1, keepdims=True), 1e-300)
        nk = resp.sum(0) + 1e-12
        w_new = nk / len(s)
        mu_new = (resp * s[:, None]).sum(0) / nk
        sd_new = np.sqrt((resp * (s[:, None] - mu_new) ** 2).sum(0) / nk) + floor
        done = np.allclose(mu_new, mu, rtol=1e-8, atol=1e-12)
        w, mu, sd = w_new, mu_new, sd_new
        if done:
            break
    order = np.argsort(mu)
    return Mixture(w[order], mu[order], sd[order])
