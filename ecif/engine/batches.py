"""The batch partition ("Seg") and streaming of batches from (possibly memory-mapped) arrays.

A pair's influence depends on who shared its batch, so the partition is drawn once from a
seed, recorded in the fitted head, and reused by every later fit, score and retraining.
Removing pairs keeps the partition; their batches just lose those members.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

CHUNK_ROWS = 8192  # rows a pass reads at a time unless told otherwise (whole batches)


@dataclass(frozen=True)
class Partition:
    """Batches as a (num_batches, width) array of row positions, -1 where empty.

    ``width`` is ``batch_size`` unless no group reaches it: then the index is only as wide
    as the largest batch (padding to the nominal size would cost a pass over empty slots,
    x25 at 40 pairs in batches of 1,000) while ``batch_size`` is kept for later partitions.
    """

    index: np.ndarray
    batch_size: int
    seed: int
    n: int

    @property
    def num_batches(self) -> int:
        return int(self.index.shape[0])

    @property
    def width(self) -> int:
        """Slots per batch row of ``index`` (what a pass over it allocates)."""
        return int(self.index.shape[1])

    def batch_of(self) -> np.ndarray:
        """Batch number of every row position (-1 for rows not in any batch); computed once
        (a trace query asks for it every time), returned read-only."""
        cached = self.__dict__.get("_batch_of")
        if cached is None:
            cached = np.full(self.n, -1, dtype=np.int64)
            b, _ = np.nonzero(self.index >= 0)
            cached[self.index[self.index >= 0]] = b
            cached.flags.writeable = False
            object.__setattr__(self, "_batch_of", cached)
        return cached

    def without(self, positions: np.ndarray) -> Partition:
        """The same partition with the given row positions removed (empty batches dropped)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return self
        index = self.index.copy()
        index[np.isin(index, positions)] = -1
        index = index[(index >= 0).any(axis=1)]
        return Partition(index=index, batch_size=self.batch_size, seed=self.seed, n=self.n)

    def members(self) -> np.ndarray:
        """Row positions that belong to some batch, sorted."""
        return np.sort(self.index[self.index >= 0])

    def of_rows(self, rows: np.ndarray, n: int) -> Partition:
        """This partition of a subset, re-indexed to the subset's ``rows`` among ``n`` rows
        (the rest in no batch): the same batches as fitting the subset alone."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) != self.n:
            raise ValueError(f"{len(rows)} row positions for a partition of {self.n} rows")
        index = np.where(self.index >= 0, rows[np.maximum(self.index, 0)], -1)
        return Partition(index=index, batch_size=self.batch_size, seed=self.seed, n=n)


def make_partition(
    n: int, batch_size: int, seed: int = 0, shuffle: bool = True, groups: np.ndarray | None = None
) -> Partition:
    """Cut rows 0..n-1 into batches of ``batch_size`` after a seeded shuffle.

    No batch holds fewer than half a batch (``min_batch``) unless the whole set does: a pair
    in a batch of one has no negatives (its loss and influence are exactly 0, so it ranked as
    the cleanest pair), and in a batch of a few its loss is on another scale. So a short last
    batch shares the rows of the one before (two batches of nearly equal size), and
    ``groups`` (one label per row, e.g. the input shard: every batch stays inside one group,
    so a shard can be scored on its own and match the concatenated set) smaller than half a
    batch join the groups next to them (``merge_small_groups``).
    """
    if n < 1:
        raise ValueError("cannot partition an empty set")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.arange(n)]
    else:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise ValueError("groups must have one label per row")
        blocks = merge_small_groups(groups, min_batch(batch_size))
        members = [np.nonzero(blocks == g)[0] for g in pd.unique(blocks)]
    width = min(batch_size, max(len(rows) for rows in members))
    out = []
    for rows in members:
        order = rows[rng.permutation(len(rows))] if shuffle else rows
        sizes = batch_sizes(len(order), batch_size)
        block = np.full((len(sizes), width), -1, dtype=np.int64)
        ends = np.cumsum(sizes)
        for b, (start, end) in enumerate(zip(ends - sizes, ends)):
            block[b, : end - start] = order[start:end]
        out.append(block)
    return Partition(index=np.concatenate(out), batch_size=batch_size, seed=seed, n=n)


def min_batch(batch_size: int) -> int:
    """The fewest pairs a batch may hold when the set has more: half a batch, rounded up."""
    return -(-batch_size // 2)


def batch_sizes(rows: int, batch_size: int) -> np.ndarray:
    """Full batches, then the rest; a rest below ``min_batch`` shares the last full batch's
    rows (two batches of nearly equal size)."""
    nb = -(-rows // batch_size)
    sizes = np.full(nb, batch_size, dtype=np.int64)
    sizes[-1] = rows - batch_size * (nb - 1)
    if nb > 1 and sizes[-1] < min_batch(batch_size):
        both = batch_size + sizes[-1]
        sizes[-2:] = (-(-both // 2), both // 2)
    return sizes


def merge_small_groups(groups: np.ndarray, least: int) -> np.ndarray:
    """Block labels (0, 1, ...): consecutive groups, in order of first appearance, joined
    until a block holds at least ``least`` rows; a small last block joins the one before.
    Groups that reach ``least`` alone stay alone (the usual shards of thousands of pairs)."""
    groups = np.asarray(groups)
    labels, first = np.unique(groups, return_index=True)
    labels = labels[np.argsort(first)]  # order of first appearance
    counts = pd.Series(groups).value_counts().reindex(labels).to_numpy()
    block_of, block, held = [], 0, 0
    for c in counts:
        if held >= least:  # the open block is full: start another
            block, held = block + 1, 0
        block_of.append(block)
        held += int(c)
    if held < least and block > 0:  # a small last block joins the one before
        block_of = [b if b < block else block - 1 for b in block_of]
    lookup = dict(zip(labels.tolist(), block_of))
    return np.array([lookup[g] for g in groups.tolist()], dtype=np.int64)


@dataclass
class Chunk:
    """A stack of batches: x (c, B, d_img), y (c, B, d_txt), mask (c, B), rows (c, B)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    rows: np.ndarray
    batch_ids: np.ndarray


def take_rows(arr, rows: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows of a tensor or (memory-mapped) array as a tensor of ``dtype`` on ``device``."""
    if isinstance(arr, torch.Tensor):
        idx = torch.as_tensor(rows, device=arr.device)
        return arr.index_select(0, idx).to(device=device, dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(arr[rows])).to(device=device, dtype=dtype)


def iter_chunks(
    x,
    y,
    partition: Partition,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    batches_per_chunk: int | None = None,
    batch_ids: np.ndarray | None = None,
) -> Iterator[Chunk]:
    """Yield stacks of batches gathered from row arrays; memory is bounded by the chunk.

    ``batch_ids`` restricts the pass to those batches (Hessian subsampling, subsets).
    """
    device = torch.device(device)
    index = partition.index
    ids = np.arange(index.shape[0]) if batch_ids is None else np.asarray(batch_ids)
    b = partition.width
    if batches_per_chunk is None:
        batches_per_chunk = max(1, CHUNK_ROWS // b)
    for start in range(0, len(ids), batches_per_chunk):
        sel = ids[start : start + batches_per_chunk]
        rows = index[sel]
        mask = rows >= 0
        safe = np.where(mask, rows, 0).reshape(-1)
        xs = take_rows(x, safe, dtype, device).reshape(len(sel), b, -1)
        ys = take_rows(y, safe, dtype, device).reshape(len(sel), b, -1)
        m = torch.from_numpy(mask).to(device)
        xs = xs * m[:, :, None]
        ys = ys * m[:, :, None]
        yield Chunk(x=xs, y=ys, mask=m, rows=rows, batch_ids=sel)
