"""Planted caption noise of several kinds, on a table of per-pair attributes.

Real web pairs go wrong in different ways, and a detector that only meets shuffled captions
is not tested: a shuffle is far from the truth, a near-miss class or a one-word edit is close
to it, and boilerplate text ("stock photo") matches no image at all. Each kind here acts on
the attributes a caption is built from, so the same noise can be planted in rendered images
(shapes, digits) and in synthetic embeddings alike.

Kinds: ``shuffle`` (another row's caption), ``confusable`` (the class named is a near-miss
of the true one, the rest right), ``attribute`` (one non-class attribute changed), ``boilerplate`` (one of a
few template captions), ``mixed`` (equal shares of the four).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

NOISE_KINDS = ("shuffle", "confusable", "attribute", "boilerplate", "mixed")
BOILERPLATE = ("image", "stock photo", "click to enlarge", "untitled picture")


@dataclass(frozen=True)
class AttributeSpace:
    """What a caption is made of: the class column, its confusable neighbours, and the values
    every other attribute can take (for one-attribute edits)."""

    class_col: str
    confusable: Mapping[str, Sequence[str]]
    values: Mapping[str, Sequence[str]]  # every caption attribute, the class column included


def plant_noise(
    attrs: pd.DataFrame, space: AttributeSpace, fraction: float, kind: str, seed: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Corrupt ``fraction`` of the rows' caption attributes.

    Returns (caption attributes, is_corrupted, noise kind per row or None). The caption table
    has the attribute columns plus ``boilerplate`` (template index, -1 for a real caption);
    rows not corrupted keep their own attributes. Deterministic in ``seed``.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}; got {kind!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"noise fraction must be in [0, 1); got {fraction}")
    n = len(attrs)
    rng = np.random.default_rng(seed)
    caps = attrs[list(space.values)].reset_index(drop=True).copy()
    caps["boilerplate"] = -1
    kinds = np.full(n, None, dtype=object)
    k = int(round(fraction * n))
    if k == 0:
        return caps, np.zeros(n, dtype=bool), kinds
    chosen = rng.choice(n, size=k, replace=False)
    if kind == "mixed":
        parts = np.array_split(chosen, 4)
        plan = dict(zip(("shuffle", "confusable", "attribute", "boilerplate"), parts))
    else:
        plan = {kind: chosen}
    for name, rows in plan.items():
        _KINDS[name](caps, rows, space, rng)
        kinds[rows] = name
    changed = (caps[list(space.values)] != attrs[list(space.values)].reset_index(drop=True)).any(
        axis=1
    ).to_numpy() | (caps["boilerplate"].to_numpy() >= 0)
    kinds[~changed] = None
    return caps, changed, kinds


def _shuffle(caps: pd.DataFrame, rows: np.ndarray, space: AttributeSpace, rng) -> None:
    """Each chosen row takes the caption of another chosen row (a random cycle)."""
    if len(rows) < 2:
        return
    order = rng.permutation(rows)
    block = caps.loc[order, list(space.values)].to_numpy()
    caps.loc[order, list(space.values)] = np.roll(block, 1, axis=0)


def _confusable(caps: pd.DataFrame, rows: np.ndarray, space: AttributeSpace, rng) -> None:
    """The class named in the caption becomes a confusable one (a husky captioned "wolf");
    everything else in the caption stays right."""
    col = space.class_col
    for i in rows:
        options = list(space.confusable.get(caps.at[i, col], ()))
        if options:
            caps.at[i, col] = options[rng.integers(len(options))]


def _attribute(caps: pd.DataFrame, rows: np.ndarray, space: AttributeSpace, rng) -> None:
    """One attribute other than the class changed to another of its values."""
    names = [c for c in space.values if c != space.class_col]
    for i in rows:
        name = names[rng.integers(len(names))]
        others = [v for v in space.values[name] if v != caps.at[i, name]]
        caps.at[i, name] = others[rng.integers(len(others))]


def _boilerplate(caps: pd.DataFrame, rows: np.ndarray, space: AttributeSpace, rng) -> None:
    caps.loc[rows, "boilerplate"] = rng.integers(0, len(BOILERPLATE), len(rows))


_KINDS = {
    "shuffle": _shuffle,
    "confusable": _confusable,
    "attribute": _attribute,
    "boilerplate": _boilerplate,
}


def caption_texts(caps: pd.DataFrame, template) -> list[str]:
    """Caption strings: ``template(row)`` for real captions, the boilerplate text otherwise."""
    out = []
    for row in caps.itertuples(index=False):
        b = int(row.boilerplate)
        out.append(BOILERPLATE[b] if b >= 0 else template(row._asdict()))
    return out
