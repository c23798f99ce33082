"""Turning misalignment scores into flags: by fraction, by count, or by an estimated noise rate."""

from __future__ import annotations

import numpy as np

from ecif.audit.metrics import two_gaussian_mixture


def estimate_noise_rate(scores: np.ndarray, iters: int = 200) -> float:
    """Fraction of the high component of a two-Gaussian mixture fitted to the scores.

    Misaligned pairs form a separate bump of high misalign_score; the mixture's weight of
    the upper component estimates how many there are. Returns 0 when the data show no
    second component (the upper mean within one pooled standard deviation of the lower).
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) < 10:
        return 0.0
    fit = two_gaussian_mixture(s, iters)
    if fit.separation < 1.0:
        return 0.0
    return float((fit.posterior_upper(s) > 0.5).mean())


def flag_count(scores: np.ndarray, threshold: str | float | int = "auto") -> tuple[int, str]:
    """How many of the top-scored pairs to flag, and a sentence saying how that was chosen.

    ``threshold``: "auto" (estimated noise rate), a float in (0, 1) (that fraction), or an
    int >= 1 (that many pairs).
    """
    n = int(np.isfinite(scores).sum())
    if isinstance(threshold, str):
        if threshold != "auto":
            try:
                threshold = float(threshold) if "." in threshold else int(threshold)
            except ValueError as err:
                raise ValueError(
                    f"threshold must be 'auto', a fraction or a count; got {threshold!r}"
                ) from err
    if threshold == "auto":
        rate = estimate_noise_rate(scores)
        return int(round(rate * n)), f"auto: estimated noise rate {rate:.1%}"
    if isinstance(threshold, float | np.floating) and not float(threshold).is_integer():
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"a fractional threshold must be in (0, 1); got {threshold}")
        return int(round(threshold * n)), f"fraction {threshold:g}"
    count = int(threshold)
    if count < 0:
        raise ValueError(f"a count threshold must be >= 0; got {count}")
    return min(count, n), f"count {count}"


def rank_and_flag(scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """rank (1 = most suspicious; NaN scores last) and is_flagged for the top ``count``."""
    s = np.where(np.isfinite(scores), scores, -np.inf)
    order = np.argsort(-s, kind="stable")
    rank = np.empty(len(s), dtype=np.int64)
    rank[order] = np.arange(1, len(s) + 1)
    return rank, rank <= count
