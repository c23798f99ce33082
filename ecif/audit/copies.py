"""An audit over distinct pairs: which rows are copies, and how their scores reach them.

The audit fits and scores each distinct pair once (``ecif.data.duplicates``); every score
array it builds is full length with NaN on the copies, and ``Copies.spread_frame`` gives each copy
its pair's values. Why: a pair held k times is fit k times (the head learns a copied swap,
so its loss falls) and its copies can be each other's negatives; the planted probes that
weigh the signals are single rows, so they mis-weigh noise that comes in copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ecif.audit.thresholds import rank_and_flag
from ecif.data.duplicates import copies_note, copy_count, distinct_rows, first_copies


@dataclass(frozen=True)
class Copies:
    """``first[i]``: the position of row i's first identical row (i for a distinct pair)."""

    first: np.ndarray

    @classmethod
    def of(cls, data) -> Copies | None:
        """The copies in an ``EmbeddingSet`` (None when it has none)."""
        first = first_copies(np.asarray(data.image), np.asarray(data.text))
        return cls(first) if copy_count(first) else None

    @property
    def distinct(self) -> np.ndarray:
        """Positions of the distinct pairs (each pair's first row), in order."""
        return distinct_rows(self.first)

    @property
    def count(self) -> int:
        return copy_count(self.first)

    def note(self) -> str:
        return copies_note(self.first) or ""

    def spread_frame(self, frame: pd.DataFrame, keep: tuple[str, ...] = ("id",)) -> pd.DataFrame:
        """``frame`` (one row per row of the set) with every column but ``keep`` spread."""
        out = frame.copy()
        for col in out.columns:
            if col not in keep:
                out[col] = out[col].to_numpy()[self.first]
        return out

    def from_distinct(self, values: np.ndarray) -> np.ndarray:
        """Values given per distinct pair (in ``distinct`` order), one per row."""
        return np.asarray(values)[np.searchsorted(self.distinct, self.first)]


def distinct_positions(copies: Copies | None, n: int) -> np.ndarray:
    """The rows an audit fits and scores: the distinct pairs, or all ``n`` rows."""
    return np.arange(n) if copies is None else copies.distinct


def placed(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Values of ``rows`` in a length-``n`` array, NaN elsewhere (for ``spread`` to fill)."""
    out = np.full(n, np.nan)
    out[rows] = values
    return out


def flags_of_rows(
    copies: Copies | None, score: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(misalign_score, rank, is_misaligned) of every row from the distinct pairs' scores and
    the count flagged among them: a copy shares its pair's score and flag; ranks run over
    the rows (a pair's copies next to each other)."""
    if copies is None:
        return (score, *rank_and_flag(score, count))
    flagged = rank_and_flag(score, count)[1]
    rows_score, rows_flag = copies.from_distinct(score), copies.from_distinct(flagged)
    rank = rank_and_flag(rows_score, int(rows_flag.sum()))[0]
    return rows_score, rank, rows_flag


def left_out_copies(partition, data) -> Copies | None:
    """The copies of a set whose head left rows out of its batches (an audit that collapsed
    copies); None when every row is in a batch."""
    if (partition.batch_of() >= 0).all():
        return None
    return Copies.of(data)


def pair_rows(copies: Copies | None, rows: np.ndarray) -> np.ndarray:
    """``rows`` with each copy replaced by its pair's first row, each pair once, in order."""
    if copies is None:
        return rows
    firsts = copies.first[rows]
    _, at = np.unique(firsts, return_index=True)
    return firsts[np.sort(at)]


def rows_holding(copies: Copies | None, rows: np.ndarray) -> np.ndarray:
    """How many rows of the set hold each of ``rows``' pairs (1: no copies)."""
    if copies is None:
        return np.ones(len(rows), dtype=np.int64)
    return np.bincount(copies.first, minlength=len(copies.first))[copies.first[rows]]
