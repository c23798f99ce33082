"""From an audit's signal columns to ``misalign_score`` (the table-level side of
``ecif.audit.combine``): the same code for an in-memory audit and for scored shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ecif.audit.combine import (
    SIGNALS,
    VALIDATED_SIGNALS,
    SuspectMixture,
    fit_mixture,
    hedged_score,
    probe_sum,
    probe_weighted_score,
    suspicion,
    weighted_sum,
)
from ecif.audit.thresholds import (
    MAX_CHECKED_RATE,
    NoiseRate,
    clearly_apart,
    mixture_noise_rate,
    spike_in_rate,
)
from ecif.audit.validation_noise import validation_noise


@dataclass
class ProbeSignals:
    """A twin audit's suspicions per row, which rows were planted, which are validation pairs
    held in it as known-clean rows (None: none) and each planted row's kind ("shuffle",
    "near", "generic": ``selection.make_probes``; "" for the other rows; None: not known;
    ``ecif.audit.probes.probe_signals``)."""

    suspicions: dict[str, np.ndarray]
    is_probe: np.ndarray
    is_clean: np.ndarray | None = None
    kinds: np.ndarray | None = None

    def shuffled_rate(self, twin: np.ndarray) -> float | None:
        """The noise rate the shuffled-caption probes alone imply (``spike_in_rate`` over the
        real rows and those probes; ``twin``: the scores of the rows ``without_clean`` keeps),
        None when the probes' kinds are not known."""
        if self.kinds is None:
            return None
        keep = self._unheld()
        shuffled = (np.asarray(self.kinds) == "shuffle")[keep]
        rows = ~self.is_probe[keep] | shuffled
        return spike_in_rate(twin[rows], shuffled[rows]) if shuffled.any() else None

    def without_clean(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The real and planted rows' suspicions and probe mask: what the probes' count of
        the noise (``spike_in_rate``) reads."""
        if self.is_clean is None:
            return self.suspicions, self.is_probe
        keep = self._unheld()
        return {k: v[keep] for k, v in self.suspicions.items()}, self.is_probe[keep]

    def _unheld(self) -> np.ndarray:
        """The rows that are not held validation pairs (all rows when none are held)."""
        if self.is_clean is None:
            return np.ones(len(self.is_probe), dtype=bool)
        return ~np.asarray(self.is_clean, dtype=bool)


# Without a validation set, the fraction of the twin's real rows left out of the probes'
# second fit (``cleaned_probe_direction``). Measured without a validation set on four grids
# (benchmarks/README.md): 10% lost on every seed of three, 30% gained only at 35% noise
# (+0.003 to +0.005 per seed) and lost on the embedding-level kinds; with a validation set,
# the same refit lost at 5-10% noise, so it is not used there.
UNVALIDATED_DROP = 0.2


def self_influence_slot(table: pd.DataFrame) -> bool:
    """Whether the audit had no validation set, so its influence slot holds self-influence."""
    return "self_influence" in table and bool(table["influence"].isna().all())


def signal_suspicions(table: pd.DataFrame, n_norm: float) -> dict[str, np.ndarray]:
    """The audit table's signals as suspicions (larger = more suspect); the influence slot
    holds self-influence when the audit had no validation set and used it. ``trusted_loss``
    and ``knn_disagreement`` (``VALIDATED_SIGNALS``) join when every scored row has them
    (``trusted_loss``: an audit with a validation set, any mode; ``knn_disagreement``: that,
    or the head mode without one): a table that mixes rows with and without them is combined
    over the signals every row has."""
    out = {
        "pair_loss": suspicion("pair_loss", table["pair_loss"].to_numpy()),
        "clip_score": suspicion("clip_score", table["clip_score"].to_numpy()),
    }
    if self_influence_slot(table):
        out["influence"] = suspicion("self_influence", table["self_influence"].to_numpy())
    else:
        out["influence"] = suspicion("influence", table["influence"].to_numpy(), n_norm)
    for name in VALIDATED_SIGNALS:
        if name in table:
            values = table[name].to_numpy()
            if np.all(np.isfinite(values) | ~np.isfinite(out["pair_loss"])):
                out[name] = suspicion(name, values)
    return out


def twin_score(
    mix: SuspectMixture, twin: dict[str, np.ndarray], weights: np.ndarray, hedge: bool, alone: bool
) -> np.ndarray:
    """A twin audit's rows (``twin``: their suspicions) scored the way ``misalign_scores``
    scores the audit's (``weights``: the probes'), each part standardised over the twin's
    rows: what the probes' count of the noise (``spike_in_rate``) ranks by."""
    score = mixture_ranking(mix, twin)
    if hedge:
        score = hedged_score(mix, twin, score)[0]
    return probe_sum(score, mix.features(twin) @ weights, alone)[0]


def mixture_ranking(mix: SuspectMixture, suspicions: dict[str, np.ndarray]) -> np.ndarray:
    """How the mixture ranks pairs: its own (quadratic) log-odds. A seam apart from its count
    of the noise (``log_odds`` > 0), so that other rankings can be tried on the same split
    (benchmarks/mixture_trials.py: linear, ridged and ray-monotone ones all lost)."""
    return mix.log_odds(suspicions)


def split_trusted(rate: NoiseRate, separation: float, valley: float) -> bool:
    """Whether the ranking may lean on the mixture's split (not hedge it, not leave it out):
    its count is trusted, or its groups are clearly apart (the density dips by
    ``CLEAR_VALLEY`` between them, as the probes' check of the count already accepts) with at
    most ``MAX_CHECKED_RATE`` suspects. Why: without probes the count is trusted only up to
    ``MAX_RATE``, and that bound on its size had also set the ranking aside at 35-50% noise,
    where the groups lay 12-15 apart (benchmarks/README.md)."""
    if rate.reliable:
        return True
    return clearly_apart(separation, valley) and 0.0 < rate.rate <= MAX_CHECKED_RATE


def probes_alone(valley: float, trusted: bool, unvalidated: bool) -> str:
    """Why the probes' weights rank alone, without the mixture's score ("": they do not).
    A mixture with one mode found no group to add. Without a validation set, a mixture whose
    split is not trusted adds only its errors: every signal it holds is fit on the training
    pairs, as the probes' are, so none can see noise the probes cannot (with one,
    ``trusted_loss`` sees swaps that recur and single planted copies do not show; there the
    hedged mixture is kept). Measured without a validation set: keeping it lost 0.013-0.045 AP
    on four digits cells, a domain the tiny CLIP was not trained on (benchmarks/README.md)."""
    if not valley > 0:
        return "one mode"
    if unvalidated and not trusted:  # ``split_trusted``
        return "split not trusted, no validation set"
    return ""


def misalign_scores(
    table: pd.DataFrame,
    mode: str,
    n_norm: float,
    probes: ProbeSignals | None = None,
    probe_rate: float | None = None,
    shuffled_rate: float | None = None,
) -> tuple[np.ndarray, dict, NoiseRate | None]:
    """misalign_score from the table's signals (docs/math.md), what combined them, and the
    noise rate the combination implies (the mixture's; None for the other modes). ``probes``:
    a twin audit's signals (``probe_signals``) that weigh the mixture's features;
    ``probe_rate``, ``shuffled_rate``: without them, the rates an earlier run's probes
    implied (a rerun that keeps its scores counts the noise as that run did)."""
    sus = signal_suspicions(table, n_norm)
    if mode == "auto":
        try:
            mix = fit_mixture(sus)
        except ValueError:  # too few pairs for a mixture: the equal-weight sum
            mode = "equal"
        else:
            log_odds, record = mix.log_odds(sus), mix.record()
            score = mixture_ranking(mix, sus)
            rate = mixture_noise_rate(log_odds, mix.separation, record["valley"])
            unvalidated = self_influence_slot(table)
            if unvalidated:  # what the "influence" slot holds, for the summary's wording
                record["influence_column"] = "self_influence"
            trusted = split_trusted(rate, mix.separation, record["valley"])
            alone = probes_alone(record["valley"], trusted, unvalidated)
            hedge = not trusted and not (alone and probes is not None)
            if hedge:
                score, record["hedge"] = hedged_score(mix, sus, score)  # with the equal sum
            if probes is None and probe_rate is not None:
                rate = mixture_noise_rate(
                    log_odds, mix.separation, record["valley"], probe_rate, shuffled_rate
                )
            if probes is not None:
                drop = UNVALIDATED_DROP if unvalidated else 0.0
                score, record["probe_weights"] = probe_weighted_score(
                    mix,
                    sus,
                    score,
                    probes.suspicions,
                    probes.is_probe,
                    alone=bool(alone),
                    drop=drop,
                    is_clean=probes.is_clean,
                )
                record["probe_weights"]["alone_because"] = alone
                weights = np.asarray(record["probe_weights"]["weights"])
                twin_sus, twin_probe = probes.without_clean()
                twin = twin_score(mix, twin_sus, weights, hedge, alone=bool(alone))
                record["probe_rate"] = spike_in_rate(twin, twin_probe)
                shuffled = probes.shuffled_rate(twin)
                if shuffled is not None:
                    record["shuffled_probe_rate"] = shuffled
                if probes.is_clean is not None:  # how noisy the held validation pairs look
                    every = twin_score(mix, probes.suspicions, weights, hedge, alone=bool(alone))
                    found = validation_noise(
                        every, probes.is_probe, probes.is_clean, kinds=probes.kinds
                    )
                    if found is not None:
                        record["validation_noise"] = found.record()
                rate = mixture_noise_rate(
                    log_odds, mix.separation, record["valley"], record["probe_rate"], shuffled
                )
            return score, record, rate
    if mode != "equal" and mode not in sus:
        raise ValueError(f"weights={mode!r}: the table has no such signal (it has {list(sus)})")
    weights = {k: 1.0 for k in SIGNALS} if mode == "equal" else {k: float(k == mode) for k in sus}
    return weighted_sum(sus, weights), {"kind": "weighted sum", "weights": weights}, None
