"""Turning misalignment scores into flags: by fraction, by count, or by an estimated noise rate."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ecif.audit.metrics import two_gaussian_mixture

FALLBACK_FRACTION = 0.1  # flagged when the noise rate cannot be estimated from the scores
UNRELIABLE = "UNRELIABLE noise-rate estimate"  # in the fallback's sentence: what readers match


class UnreliableThresholdWarning(UserWarning):
    """The automatic threshold fell back to the top ``FALLBACK_FRACTION``: the flag count is
    a guess (the sentence says why and what to pass instead)."""


@dataclass(frozen=True)
class NoiseRate:
    """A noise-rate estimate and whether the scores support it."""

    rate: float
    reliable: bool
    why: str = ""
    probe_rate: float | None = None  # the rate planted probes imply (``spike_in_rate``)
    shuffled_rate: float | None = None  # the same, from the shuffled-caption probes alone
    score_rate: float | None = None  # the final score's own count (``checked_by_score``)

    def fallback_fraction(self) -> float:
        """The share an untrusted estimate flags: ``FALLBACK_FRACTION``, or as many pairs as
        score like planted shuffled captions when that is more and a plausible noise rate
        (``shuffled_floor``)."""
        return max(FALLBACK_FRACTION, self.shuffled_floor())

    def shuffled_floor(self) -> float:
        """The shuffled probes' count as a floor: 0 when there is none or it is over
        ``MAX_CHECKED_RATE``. Why not capped there instead: a count that high says the probes
        score like the bulk of the set, not that half of it is noise (4-dimensional
        embeddings: AP 0.24 at chance 0.20, the probes counted 100%, and half the set was
        flagged)."""
        floor = self.shuffled_rate if self.shuffled_rate is not None else 0.0
        return floor if floor <= MAX_CHECKED_RATE else 0.0


def noise_rate(scores: np.ndarray, iters: int = 200) -> NoiseRate:
    """The weight of the upper component of a two-Gaussian mixture fitted to the scores.

    Misaligned pairs form a separate bump of high misalign_score. When the ranking is weak
    they do not: the mixture's means lie within one pooled standard deviation, and its weight
    says nothing about the noise rate (on digits the tiny model cannot read, the old rule
    returned 0 and flagged nothing of 15% planted noise). Such estimates are marked
    unreliable, as are rates above 50%.
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) < 10:
        return NoiseRate(0.0, False, f"only {len(s)} scored pairs")
    fit = two_gaussian_mixture(s, iters)
    rate = float((fit.posterior_upper(s) > 0.5).mean())
    if fit.separation < 1.0:
        return NoiseRate(
            rate, False, f"no separate group of suspects (separation {fit.separation:.2f} sd)"
        )
    if not 0.0 < rate <= 0.5:
        return NoiseRate(rate, False, f"implausible estimate {rate:.1%}")
    return NoiseRate(rate, True)


# a suspect mixture's noise rate is trusted above this Mahalanobis distance of its means and
# at most MAX_RATE suspects (measured: on noise the signals barely see, fits came out at
# 39-51% with separations of 1.7-2.3; separated fits estimated 15-27% for 20% planted noise)
MIN_SEPARATION = 2.0
MAX_RATE = 0.3
# with planted probes to check it against (``spike_in_rate``), up to MAX_CHECKED_RATE, and only
# when the two agree within PROBE_AGREEMENT or the mixture's density dips by CLEAR_VALLEY
# (log-density, so to e^-1 of its lower peak) between its groups: a group that clearly apart
# needs no check, and the probes undercount noise unlike them (benchmarks/README.md)
MAX_CHECKED_RATE = 0.5
PROBE_AGREEMENT = 1.5
CLEAR_VALLEY = 1.0
PROBE_RECALL = 0.5  # the spike-in counts real rows above the score half the probes reach
# with planted probes, a count is trusted only where the mixture's density dips by at least
# this much (log-density) between its groups: below it, the density has all but one mode, and
# counts came out at 1.2-1.9x the noise while the probes' check passed them (they too count
# noise plainer than most probes at up to 2x); the shuffled probes' count is flagged instead
# (benchmarks/README.md, "The threshold where the mixture barely has two modes")
MIN_CHECKED_VALLEY = 0.25


def clearly_apart(separation: float, valley: float) -> bool:
    """Whether a mixture's two groups are clearly apart: means ``MIN_SEPARATION`` apart and a
    density that dips by ``CLEAR_VALLEY`` between them (``SuspectMixture.valley``)."""
    return valley >= CLEAR_VALLEY and separation >= MIN_SEPARATION


def spike_in_rate(
    twin_score: np.ndarray, is_probe: np.ndarray, recall: float = PROBE_RECALL
) -> float:
    """The noise rate that planted probes imply: the fraction of a twin audit's real rows that
    score at least as high as ``recall`` of its probes do, divided by ``recall``.

    Probes are known misaligned pairs planted among the real ones (``ecif.audit.probes``); a
    real misaligned pair that looks like them scores like them, so above the probes' median
    score lie about half the real noise and few clean pairs. An independent count of the
    noise, for checking the mixture's: it undercounts noise subtler than the probes (an
    attribute edit) and overcounts noise plainer than them."""
    s = np.asarray(twin_score, dtype=np.float64)
    probe = np.asarray(is_probe, dtype=bool)
    ok = np.isfinite(s)
    real, planted = s[ok & ~probe], s[ok & probe]
    if len(real) == 0 or len(planted) == 0:
        raise ValueError("a spike-in rate needs scored real rows and scored probes")
    cut = np.quantile(planted, 1.0 - recall)
    return float((real >= cut).mean() / recall)


def mixture_noise_rate(
    log_odds: np.ndarray,
    separation: float,
    valley: float | None = None,
    probe_rate: float | None = None,
    shuffled_rate: float | None = None,
) -> NoiseRate:
    """The noise rate a suspect mixture implies (pairs with positive log-odds), trusted when
    its components are apart (``MIN_SEPARATION``), its density has two modes (``valley`` > 0,
    ``SuspectMixture.valley``; None: not checked) and the suspects are a minority: at most
    ``MAX_RATE``, or with ``probe_rate`` (``spike_in_rate``) at most ``MAX_CHECKED_RATE`` and
    no more than ``PROBE_AGREEMENT`` times the probes' count unless the valley is
    ``CLEAR_VALLEY`` deep, and with a valley of at least ``MIN_CHECKED_VALLEY``. Why the
    check: where the groups barely part (5% noise), the suspect component takes in the bulk's
    tail and counted 2-3x the noise (measured). ``shuffled_rate``: the shuffled-caption
    probes' count, carried for the fallback (``NoiseRate.fallback_fraction``)."""
    s = np.asarray(log_odds, dtype=np.float64)
    s = s[np.isfinite(s)]
    rate = float((s > 0).mean()) if len(s) else 0.0

    def unreliable(why: str) -> NoiseRate:
        return NoiseRate(rate, False, why, probe_rate, shuffled_rate)

    if separation < MIN_SEPARATION:
        return unreliable(f"no separate group of suspects (separation {separation:.2f})")
    if valley is not None and not valley > 0:
        return unreliable("no separate group of suspects (the mixture's density has one mode)")
    if probe_rate is not None and valley is not None and valley < MIN_CHECKED_VALLEY:
        return unreliable(
            f"the mixture's density barely dips between its groups (valley {valley:.2f}, "
            f"under {MIN_CHECKED_VALLEY:g}): its suspect group takes in clean pairs"
        )
    top = MAX_RATE if probe_rate is None else MAX_CHECKED_RATE
    if not 0.0 < rate <= top:
        return unreliable(
            f"{rate:.1%} in the suspect group, outside the 0-{top:.0%} it is trusted for"
        )
    clear = valley is not None and valley >= CLEAR_VALLEY
    if probe_rate is not None and not clear and rate > PROBE_AGREEMENT * probe_rate:
        return unreliable(
            f"{rate:.1%} in the suspect group, over {PROBE_AGREEMENT:g}x the {probe_rate:.1%} "
            "that planted probes imply, and the group is not clearly apart: it takes in clean "
            "pairs, or the noise is subtler than the probes"
        )
    return NoiseRate(rate, True, "", probe_rate, shuffled_rate)


# a mixture's count is trusted only within this factor of the count that the final score's own
# two groups imply (``checked_by_score``); the same factor as the probes' check, not tuned
SCORE_AGREEMENT = 1.5


def checked_by_score(rate: NoiseRate, scores: np.ndarray) -> NoiseRate:
    """``rate`` (the suspect mixture's count over all signals) checked against the count a
    two-Gaussian fit to the final scores implies (``noise_rate``): a trusted count more than
    ``SCORE_AGREEMENT`` times that one is not trusted. Why: the mixture's suspect component,
    fit on every signal at once, can take in clean pairs that stand out on one signal the
    final score weighs little (the spread of a caption's neighbours, say) while the final
    score sets them among the clean ones. Measured (benchmarks/README.md): class captions
    without a validation set, 32-39% counted for 20% planted where the final score's own
    groups held 19-20%; a continuous latent's cone, 49% where they held 29-32%."""
    if not rate.reliable:
        return rate
    one = noise_rate(scores)
    if not one.reliable:
        return rate
    checked = replace(rate, score_rate=one.rate)
    if rate.rate <= SCORE_AGREEMENT * one.rate:
        return checked
    return replace(
        checked,
        reliable=False,
        why=f"{rate.rate:.1%} in the suspect group, over {SCORE_AGREEMENT:g}x the "
        f"{one.rate:.1%} that the final score's own two groups hold: the group takes in pairs "
        "the combined score ranks among the clean ones",
    )


def estimate_noise_rate(scores: np.ndarray, iters: int = 200) -> float:
    """The reliable noise-rate estimate, else 0 (see ``noise_rate``)."""
    est = noise_rate(scores, iters)
    return est.rate if est.reliable else 0.0


def flag_count(
    scores: np.ndarray, threshold: str | float | int = "auto", rate: NoiseRate | None = None
) -> tuple[int, str]:
    """How many of the top-scored pairs to flag, and a sentence saying how that was chosen.

    ``threshold``: "auto" (estimated noise rate; when the scores cannot support an estimate,
    the top ``NoiseRate.fallback_fraction`` and a sentence saying so), a float in (0, 1)
    (that fraction), or an int >= 1 (that many pairs).
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
        est = checked_by_score(rate, scores) if rate is not None else noise_rate(scores)
        if est.reliable:
            counts = [f"planted probes: {est.probe_rate:.1%}"] if est.probe_rate is not None else []
            if est.score_rate is not None:
                counts.append(f"the final score's own groups: {est.score_rate:.1%}")
            also = f" ({'; '.join(counts)})" if counts else ""
            return int(round(est.rate * n)), f"auto: estimated noise rate {est.rate:.1%}{also}"
        share = est.fallback_fraction()
        # the pooled probes' count is quoted beside the 10% only: the floor says what it read
        if est.shuffled_rate is not None and est.shuffled_rate > MAX_CHECKED_RATE:
            quoted = (
                " Planted shuffled captions score like most of the set's own pairs (they imply "
                f"over {MAX_CHECKED_RATE:.0%} noise): the scores barely tell a random caption "
                "from a real one here, so no count can be read from them."
            )
        else:
            quoted = "" if share > FALLBACK_FRACTION else _probe_floor(est)
        return int(round(share * n)), (
            f"auto: {UNRELIABLE} ({est.why}); flagged the top {100 * share:.3g}%"
            f"{_shuffled_floor(share)}.{quoted} If you know your noise rate, pass "
            "--threshold FRACTION (e.g. 0.15) or a COUNT"
        )
    if isinstance(threshold, float | np.floating) and not float(threshold).is_integer():
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"a fractional threshold must be in (0, 1); got {threshold}")
        return int(round(threshold * n)), f"fraction {threshold:g}"
    count = int(threshold)
    if count < 0:
        raise ValueError(f"a count threshold must be >= 0; got {count}")
    return min(count, n), f"count {count}"


def _shuffled_floor(share: float) -> str:
    """Why the fallback flagged more than ``FALLBACK_FRACTION`` ("" when it did not)."""
    if share <= FALLBACK_FRACTION:
        return ""
    return (
        ": as many as score like planted shuffled captions (a floor for noise as plain as a "
        "random caption; subtler noise scores below them)"
    )


def _probe_floor(est: NoiseRate) -> str:
    """What the planted probes counted, when the fallback was taken without quoting it. On a
    clean or nearly clean set it is the figure that says so (measured over four geometries:
    0.0-2.5% with no noise, 0.7-6.0% with 1%, 2.5-7.7% with 5%, where the fallback flags
    10%), but it cannot replace the fallback: noise subtler than the probes hides below it
    (0.0-0.4% with 20% near-miss swaps or attribute edits on the synthetic encoders)."""
    if est.probe_rate is None or "planted probes imply" in est.why:
        return ""
    if est.probe_rate > FALLBACK_FRACTION:  # the probes count more than the fallback flags
        return (
            f" Planted probes imply {est.probe_rate:.1%}: the set may hold more noise than "
            f"that top {FALLBACK_FRACTION:.0%} (probes overcount noise plainer than they are, "
            "such as template captions)."
        )
    return (
        f" Planted probes imply {est.probe_rate:.1%}: the set may be cleaner than that top "
        f"{FALLBACK_FRACTION:.0%}, or its noise subtler than probes (near-miss swaps, "
        "attribute edits), which they undercount."
    )


def rank_and_flag(scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """rank (1 = most suspicious; NaN scores last) and is_flagged for the top ``count``."""
    s = np.where(np.isfinite(scores), scores, -np.inf)
    order = np.argsort(-s, kind="stable")
    rank = np.empty(len(s), dtype=np.int64)
    rank[order] = np.arange(1, len(s) + 1)
    return rank, rank <= count
