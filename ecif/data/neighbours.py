"""Each row's nearest other rows of one embedding side, through the FAISS index of
``ecif.data.index``: what the kNN consensus signal (``ecif.audit.baselines.lemon``) reads,
for a whole training set at once.

Every row queries the whole set, so an exact search costs N^2 d: it is kept below
``EXACT_MAX_ROWS`` rows (where it stays a small share of an audit) and IVF does the rest.
A row's own entry is left out; an exact duplicate of it is a neighbour like any other.
The IVF search visits ``NPROBE`` lists: fewer than trace-back's 32, because every row of the
set queries it and the consensus averages its neighbours (a near neighbour found in place of a
true one moves it little).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ecif.data.index import VectorIndex

# exact kNN graph below this many rows, IVF above (benchmarks/bench_consensus.py: exact at
# 100k rows took 45% of a whole audit's time)
EXACT_MAX_ROWS = 50_000
KINDS = ("auto", "flat", "ivf")
# IVF lists each query visits (of 4 sqrt(N)); trace-back's index visits 32. Measured alone
# (benchmarks/bench_consensus.py, 200,000 CLIP-like pairs, same process): 16 took 25.6 s
# against 38.6 s at 32, recall@10 0.906 against 0.973, and the consensus's AP did not fall
# (0.6868 against 0.6861; exact 0.6858); 8 saved 7 s more at recall 0.78 (AP 0.6877), left
# for sets whose neighbours are less clear-cut than these.
NPROBE = 16


def nearest_rows(
    vectors: Any,
    k: int,
    *,
    kind: str = "auto",
    device: str = "cpu",
    chunk: int = 65536,
    progress: bool = False,
    index: VectorIndex | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, rows), each (n, k'), k' = min(k, n - 1): every row's k nearest other rows
    by cosine, nearest first. ``kind``: flat (exact), ivf, or auto (exact below
    ``EXACT_MAX_ROWS`` rows). Rows an IVF search could not fill are -1 (cosine -inf).
    ``index``: one already built over ``vectors`` (``neighbour_index``), read instead."""
    n = int(vectors.shape[0])
    if n < 2:
        raise ValueError(f"nearest rows need at least 2 rows; got {n}")
    index = (
        neighbour_index(vectors, kind, device, progress) if index is None else _checked(index, n)
    )
    k = min(int(k), n - 1)
    sims = np.empty((n, k), dtype=np.float32)
    rows = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, chunk):
        block = np.asarray(vectors[s : s + chunk])
        own = np.arange(s, s + len(block))
        found_sims, found = index.search(block, k + 1)
        sims[own], rows[own] = _without_self(found_sims, found, own, k)
    return _unfilled_marked(sims, rows)


def nearest_in(
    reference: Any,
    queries: Any,
    k: int,
    *,
    kind: str = "auto",
    device: str = "cpu",
    chunk: int = 65536,
    index: VectorIndex | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, rows), each (q, k'), k' = min(k, n): each query's k nearest rows of
    ``reference`` by cosine, nearest first (queries are not rows of it, so none is left out).
    ``kind`` as ``nearest_rows``, by the reference's size. Unfilled rows are -1.
    ``index``: one already built over ``reference`` (``neighbour_index``), read instead."""
    n = int(reference.shape[0])
    if n < 1:
        raise ValueError("nearest rows need a reference of at least 1 row")
    index = neighbour_index(reference, kind, device) if index is None else _checked(index, n)
    k = min(int(k), n)
    q = np.asarray(queries)
    sims = np.empty((len(q), k), dtype=np.float32)
    rows = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):
        sims[s : s + chunk], rows[s : s + chunk] = index.search(q[s : s + chunk], k)
    return _unfilled_marked(sims, rows)


def neighbour_index(
    vectors: Any, kind: str = "auto", device: str = "cpu", progress: bool = False
) -> VectorIndex:
    """The FAISS index the searches above read: ``kind`` checked, auto = exact below
    ``EXACT_MAX_ROWS`` rows, IVF above (visiting ``NPROBE`` lists). Built once, it serves
    both a set's own kNN graph and later queries into the set."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if kind == "auto":
        kind = "flat" if int(vectors.shape[0]) < EXACT_MAX_ROWS else "ivf"
    return VectorIndex.build(
        vectors, side="image", kind=kind, nprobe=NPROBE, device=device, progress=progress
    )


def _checked(index: VectorIndex, n: int) -> VectorIndex:
    """A given index, if it holds the n rows it is said to index."""
    if index.n != n:
        raise ValueError(f"the index holds {index.n} rows; the vectors have {n}")
    return index


def _unfilled_marked(sims: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows an IVF search could not fill (or with a non-finite cosine) as -1, cosine -inf."""
    rows[~np.isfinite(sims) | (rows < 0)] = -1
    sims[rows < 0] = -np.inf
    return sims, rows


def _without_self(
    sims: np.ndarray, rows: np.ndarray, own: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k entries of each k+1 search result other than the query's own row (the last one
    when its own row is not among them: ties with duplicates can push it out)."""
    drop = rows == own[:, None]
    missing = ~drop.any(axis=1)
    drop[missing, -1] = True
    first = np.argsort(drop, axis=1, kind="stable")[:, :k]  # the kept entries, in order
    return np.take_along_axis(sims, first, 1), np.take_along_axis(rows, first, 1)
