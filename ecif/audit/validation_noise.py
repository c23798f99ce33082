"""How noisy the validation set itself looks: read off the twin audit's rows.

An audit trusts its validation pairs: influence is measured against their loss, and
``trusted_loss`` is a head fit on them. A validation set cut from the same web data as the
training set holds the same noise, and nothing else in the audit would say so. The twin audit
(``ecif.audit.probes``) already holds half of the validation pairs as rows beside the real
ones and the planted probes, fit and scored alike, so their ranks can be compared.

With s the twin's rows scored as ``misalign_score`` scores the audit's
(``misalign.twin_score``), let A(X, Y) = P(s_X > s_Y). If the real rows R are a share pi of
noise N among clean pairs C, the held validation rows V a share rho, and the probes P score
like N, then A(P, R) - 1/2 = (1 - pi) (A(N, C) - 1/2) and A(P, V) - 1/2 = (1 - rho)
(A(N, C) - 1/2), so

    rho = 1 - (1 - pi) (A(P, V) - 1/2) / (A(P, R) - 1/2),

with pi the probes' count of the training noise (``thresholds.spike_in_rate``) over the same
probes. P is one kind of probe at a time, shuffled captions and generic ones, and the larger
estimate is kept: the formula holds for probes that score like the noise, which a pooled set
does not (the nearest-image probes score like clean pairs on a continuous latent with no
classes, where the pooled count read 34% for 20% noise and four of 24 clean validation sets
warned). Like that count, it sees the noise the probes resemble (shuffled and generic
captions) and undercounts subtler kinds (near-miss swaps, one-attribute edits). Measured on
nine geometries x four kinds, 2 seeds each (benchmarks/README.md, "A noisy validation set" and
"Each kind of probe alone"): no warning on 72 clean validation sets (largest estimate 8.2%);
with 20% noise in the validation set a warning on 47 of 72: all 46 with shuffled, boilerplate
or mixed noise, 1 of 8 with one-attribute edits, none of 18 with near-miss swaps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ecif.audit.metrics import auroc
from ecif.audit.thresholds import spike_in_rate

# an estimate of at least NOISY_VALIDATION whose 95% interval starts at INTERVAL_FLOOR or
# above warns. The floor: on clean validation sets the interval's lower end reached 0.009 (two
# held-out geometries' audits, where an interval merely above 0 had warned, benchmarks/README.md)
NOISY_VALIDATION = 0.05
INTERVAL_FLOOR = 0.02
MIN_PROBE_LEAD = 0.05  # A(P, R) - 1/2 below this: the probes barely outrank the real rows
# the probe kinds read one at a time (``selection.make_probes``): each scores like one kind of
# noise. Not "near" (the caption of the pair with the nearest image): on a continuous latent
# with no classes it scores like a clean pair
LIKE_NOISE = ("shuffle", "generic")
MIN_LIKE_NOISE = 20  # probes of a kind needed to read it alone
BOOTSTRAPS = 200


class NoisyValidationWarning(UserWarning):
    """The validation pairs look noisy: influence and ``trusted_loss`` learn from them."""


@dataclass(frozen=True)
class ValidationNoise:
    """The estimated share of noisy pairs among the validation pairs the twin held, its 95%
    bootstrap interval, how many were held, and the AUROC of the training rows' scores over
    theirs (0.5: the validation pairs look as suspect as the training pairs)."""

    rate: float
    low: float
    high: float
    held: int
    training_over_validation: float
    probes: str = "all"  # the probe kind it was read off ("shuffle", "generic"), or "all"

    @property
    def noisy(self) -> bool:
        return self.rate >= NOISY_VALIDATION and self.low >= INTERVAL_FLOOR

    def record(self) -> dict:
        return {
            "rate": self.rate,
            "interval": [self.low, self.high],
            "held": self.held,
            "training_over_validation_auroc": self.training_over_validation,
            "noisy": self.noisy,
            "probes": self.probes,
        }


def _over(a: np.ndarray, b: np.ndarray) -> float:
    """A(a, b) = P(a > b), ties counted half: the AUROC of ``a`` over ``b``."""
    return auroc(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b])


def rate_of(score: np.ndarray, probe: np.ndarray, clean: np.ndarray) -> float:
    """rho (the module's formula) from one twin's scores; NaN when the probes barely outrank
    the real rows (then no count of either set can be read off them)."""
    lead_real = _over(score[probe], score[~probe & ~clean]) - 0.5
    if not lead_real >= MIN_PROBE_LEAD:
        return float("nan")
    lead_val = _over(score[probe], score[clean]) - 0.5
    pi = min(spike_in_rate(score[~clean], probe[~clean]), 1.0)
    return float(np.clip(1.0 - (1.0 - pi) * lead_val / lead_real, 0.0, 1.0))


def validation_noise(
    score: np.ndarray,
    is_probe: np.ndarray,
    is_clean: np.ndarray,
    seed: int = 0,
    kinds: np.ndarray | None = None,
) -> ValidationNoise | None:
    """The validation set's estimated noise from a twin's scores on all of its rows (larger =
    more suspect; ``is_clean``: the held validation pairs; ``kinds``: each row's probe kind,
    None when not known: then all probes are read together); None when the probes barely
    outrank the real rows or a group is empty. Each kind in ``LIKE_NOISE`` with
    ``MIN_LIKE_NOISE`` probes is read alone, and the largest estimate is kept."""
    s = np.asarray(score, dtype=np.float64)
    probe, clean = np.asarray(is_probe, bool), np.asarray(is_clean, bool)
    found = []
    for kind in LIKE_NOISE if kinds is not None else ():
        alone = probe & (np.asarray(kinds) == kind)
        if np.count_nonzero(alone) >= MIN_LIKE_NOISE:
            keep = ~probe | alone  # the other probes leave the comparison
            found.append(_estimate(s[keep], probe[keep], clean[keep], seed, kind))
    found = [f for f in found if f is not None]
    return max(found, key=lambda f: f.rate) if found else _estimate(s, probe, clean, seed, "all")


def _estimate(
    s: np.ndarray, probe: np.ndarray, clean: np.ndarray, seed: int, which: str
) -> ValidationNoise | None:
    """``rate_of`` and its 95% interval from resampling each group (real, probes, held) with
    replacement; None when a group is empty or the probes barely outrank the real rows."""
    ok = np.isfinite(s)
    s, probe, clean = s[ok], probe[ok], clean[ok]
    real = ~probe & ~clean
    if not (probe.any() and clean.any() and real.any()):
        return None
    rate = rate_of(s, probe, clean)
    if not np.isfinite(rate):
        return None
    rng = np.random.default_rng([seed, 17])
    groups = [np.nonzero(g)[0] for g in (real, probe, clean)]
    draws = []
    for _ in range(BOOTSTRAPS):
        rows = np.concatenate([rng.choice(g, len(g)) for g in groups])
        draws.append(rate_of(s[rows], probe[rows], clean[rows]))
    low, high = np.nanquantile(np.asarray(draws), [0.025, 0.975])
    over = _over(s[real], s[clean])
    return ValidationNoise(rate, float(low), float(high), int(clean.sum()), over, which)


def noisy_validation_text(record: dict) -> str:
    """The warning's sentence: the estimate, what it corrupts, and what to do instead."""
    low, high = record["interval"]
    return (
        f"the validation set looks noisy: about {record['rate']:.0%} of its pairs score like "
        f"planted misaligned pairs (95% interval {low:.0%}-{high:.0%}, from the "
        f"{record['held']} held in the twin audit). Influence is measured against the "
        "validation loss and trusted_loss is a head fit on those pairs, so both learn from its "
        "noise (measured: 20% noise there cost 0.022 mean AP, yet still ranked 0.009 above no "
        "validation set). A validation set cut from the same data as the training set holds "
        "the same noise: pass a curated one (pairs checked by hand) if you have it."
    )


def warn_if_noisy(combination: dict) -> str | None:
    """Warn (``NoisyValidationWarning``) when the combination's record found the validation
    set noisy, and return the sentence (None: it did not): said in the API, the CLI,
    ``audit.json`` and the app, as every recorded audit warning."""
    found = combination.get("validation_noise")
    if not (found and found["noisy"]):
        return None
    text = noisy_validation_text(found)
    warnings.warn(text, NoisyValidationWarning, stacklevel=3)
    return text
