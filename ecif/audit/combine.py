"""From several per-pair signals to the one ranking a user sees (``misalign_score``).

No single signal wins everywhere: the pretrained similarity (``clip_score``) is strong when the
encoder knows the domain, the pair's own loss under the head when a caption is plainly wrong,
ECIF's influence when the validation set says which pairs pull the head the wrong way. Each
signal is turned into a suspicion (larger = more suspect), standardised robustly (median and
interquartile range over the training set), and summed with weights. The weights are chosen
per audit by how well the sum ranks planted probes (``ecif.audit.selection``), from a small
fixed set of candidates, so the choice cannot overfit much.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SIGNALS = ("influence", "pair_loss", "clip_score")
# candidate weightings, the equal-weight sum first (the fallback when probes cannot tell)
CANDIDATE_WEIGHTS: tuple[dict[str, float], ...] = (
    {"influence": 1.0, "pair_loss": 1.0, "clip_score": 1.0},
    {"influence": 1.0, "pair_loss": 0.0, "clip_score": 0.0},
    {"influence": 0.0, "pair_loss": 1.0, "clip_score": 0.0},
    {"influence": 0.0, "pair_loss": 0.0, "clip_score": 1.0},
    {"influence": 1.0, "pair_loss": 1.0, "clip_score": 0.0},
    {"influence": 1.0, "pair_loss": 0.0, "clip_score": 1.0},
    {"influence": 0.0, "pair_loss": 1.0, "clip_score": 1.0},
)


def suspicion(name: str, values: np.ndarray, n_norm: float = 1.0) -> np.ndarray:
    """A signal oriented so that larger = more suspicious (float64; NaN stays NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if name == "influence":  # negative influence = removing the pair lowers validation loss
        return -v * n_norm
    if name == "self_influence":  # the head bends far to fit the pair
        return v
    if name == "pair_loss":
        return v
    if name == "clip_score":
        return -v
    raise ValueError(f"unknown signal {name!r}; expected one of {SIGNALS + ('self_influence',)}")


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


def combine(
    suspicions: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    stats: Mapping[str, Standardiser] | None = None,
) -> np.ndarray:
    """sum_k w_k * z_k, z_k the standardised suspicion k (``stats`` from the training set;
    computed from ``suspicions`` when not given). Signals with weight 0 are not read."""
    out = None
    for name, w in weights.items():
        if w == 0:
            continue
        if name not in suspicions:
            raise KeyError(f"the combination needs the signal {name!r}")
        st = (stats or {}).get(name) or Standardiser.of(suspicions[name])
        term = w * st(suspicions[name])
        out = term if out is None else out + term
    if out is None:
        raise ValueError("all combination weights are 0")
    return out


def describe_weights(weights: Mapping[str, float]) -> str:
    used = [f"{w:g} x {k}" for k, w in weights.items() if w]
    return " + ".join(used) if used else "nothing"
