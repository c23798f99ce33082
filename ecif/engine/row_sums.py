"""Sums over the partition's batches, block by block: where every pass over the pairs happens.

Every full-data quantity of the head (the objective, its gradient, Hessian-vector products,
the dense Hessian, the EK-FAC factors) is a sum over batches of a term computed from a stack
of batches (a ``Chunk``). The batches are cut into fixed blocks of ``BLOCK_BATCHES``
consecutive batch numbers; a pass sums each block's chunks in order, then the blocks in
order. The block is also the unit of distribution (``ecif.engine.cluster_rows``): a worker
keeps its blocks' rows in memory and returns one sum per block, which the driver adds in the
same order, so a cluster gives bitwise the result of this process whatever its worker count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ecif.engine.batches import Chunk, Partition, iter_chunks

# 512 batches of 256 = 131k rows: a few MB of partial sums per pass at d = 512, and blocks
# small enough to spread 1M pairs over 8 workers
BLOCK_BATCHES = 512

Sums = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Pass:
    """One sum over batches: ``kernel(chunk, state, *args)`` summed over chunks, with
    ``state = prepare(chunk, *prepare_args)`` (None without ``prepare``). With a ``cache_key``
    the (chunk, state) pairs are kept, up to the source's byte budget, for later passes with
    the same key (CG's products at one theta), skipping the read and the forward work."""

    kernel: Callable[..., Sums]
    args: tuple = ()
    prepare: Callable[..., Any] | None = None
    prepare_args: tuple = ()
    cache_key: bytes | None = None


class RowSource(Protocol):
    """Where the training pairs are: this process (``LocalRows``) or a cluster's workers."""

    def reduce(
        self,
        p: Pass,
        partition: Partition,
        batch_ids: np.ndarray | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Sums | None:
        """The pass's sums over the given batches (all when None); None if there are none."""
        ...

    def with_cache(self, cache_bytes: int) -> RowSource:
        """The same rows (and pass count), keeping chunks of keyed passes up to
        ``cache_bytes``."""
        ...

    @property
    def count(self) -> PassCount:
        """Batches the passes over these rows computed so far."""
        ...


def blocks_of(
    partition: Partition, batch_ids: np.ndarray | None = None
) -> list[tuple[int, np.ndarray]]:
    """(block number, its batches among ``batch_ids``) for every block that has some, in
    order; ``batch_ids`` must be sorted (subsamples are)."""
    ids = np.arange(partition.num_batches) if batch_ids is None else np.asarray(batch_ids)
    if len(ids) > 1 and np.any(np.diff(ids) <= 0):
        raise ValueError("batch ids of a pass must be sorted and distinct")
    block = ids // BLOCK_BATCHES
    cuts = np.nonzero(np.diff(block))[0] + 1
    return [(int(s[0]) // BLOCK_BATCHES, s) for s in np.split(ids, cuts) if len(s)]


def num_blocks(partition: Partition) -> int:
    return -(-partition.num_batches // BLOCK_BATCHES)


def block_batches(partition: Partition, k: int) -> np.ndarray:
    """Batch numbers of block ``k``."""
    return np.arange(k * BLOCK_BATCHES, min((k + 1) * BLOCK_BATCHES, partition.num_batches))


def add(total: Sums | None, part: Sums | None) -> Sums | None:
    if part is None:
        return total
    if total is None:
        return part
    return tuple(a + b for a, b in zip(total, part, strict=True))


def state_bytes(ch: Chunk, state: Any) -> int:
    """Bytes of the floating-point tensors a cached (chunk, state) pair holds (the state: a
    tensor, a tuple of them, or a dataclass of them)."""
    items: list = [ch.x, ch.y]
    todo = [state]
    while todo:
        a = todo.pop()
        if isinstance(a, torch.Tensor):
            items.append(a)
        elif isinstance(a, tuple | list):
            todo.extend(a)
        elif hasattr(a, "__dict__"):
            todo.extend(vars(a).values())
    return sum(a.numel() * a.element_size() for a in items if a.is_floating_point())


class ChunkCache:
    """(chunk, state) pairs of one pass key: each block's first chunks, up to ``budget``
    bytes in all."""

    def __init__(self, budget: int):
        self.budget = budget
        self.key: bytes | None = None
        self.items: dict[int, list[tuple[Chunk, Any]]] = {}
        self.ids: dict[int, np.ndarray] = {}  # the batches each slot's chunks came from
        self.used = 0

    def run(
        self, p: Pass, slot: int, ids: np.ndarray, chunks: Callable[[np.ndarray], Iterable[Chunk]]
    ) -> Sums | None:
        """The pass over one block's batches ``ids`` (``slot`` names the block); ``chunks``
        gathers the chunks of a run of those ids. Cached chunks are reused, not re-read."""
        if p.cache_key is None or self.budget <= 0:
            return sum_chunks(p, chunks(ids))
        if p.cache_key != self.key:
            self.key, self.items, self.ids, self.used = p.cache_key, {}, {}, 0
        if slot in self.ids and not np.array_equal(self.ids[slot], ids):
            return sum_chunks(p, chunks(ids))  # other batches at the same key: not cached
        self.ids[slot] = ids
        kept = self.items.setdefault(slot, [])
        total, done = None, 0
        for ch, state in kept:
            total = add(total, p.kernel(ch, state, *p.args))
            done += len(ch.batch_ids)
        filling = True
        for ch in chunks(ids[done:]):
            state = None if p.prepare is None else p.prepare(ch, *p.prepare_args)
            total = add(total, p.kernel(ch, state, *p.args))
            size = state_bytes(ch, state)
            filling = filling and self.used + size <= self.budget
            if filling:
                kept.append((ch, state))
                self.used += size
        return total

    @property
    def batches(self) -> int:
        """Batches whose chunks are cached."""
        return sum(len(ch.batch_ids) for kept in self.items.values() for ch, _ in kept)


def sum_chunks(p: Pass, chunks: Iterable[Chunk]) -> Sums | None:
    total = None
    for ch in chunks:
        state = None if p.prepare is None else p.prepare(ch, *p.prepare_args)
        total = add(total, p.kernel(ch, state, *p.args))
    return total


@dataclass
class PassCount:
    """Batches a source's passes computed (cached ones included) and read from the rows:
    divided by the partition's batches, the passes spent (``ecif.engine.sampled_newton``)."""

    computed: int = 0
    read: int = 0


class LocalRows:
    """The pairs as row arrays of this process (NumPy, memory-mapped or torch)."""

    def __init__(self, x, y, cache_bytes: int = 0, count: PassCount | None = None):
        self.x, self.y = x, y
        self.cache = ChunkCache(cache_bytes)
        self.count = count if count is not None else PassCount()

    def reduce(
        self,
        p: Pass,
        partition: Partition,
        batch_ids: np.ndarray | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Sums | None:
        total = None
        for k, ids in blocks_of(partition, batch_ids):

            def chunks(sel: np.ndarray) -> Iterable[Chunk]:
                self.count.read += len(sel)
                return iter_chunks(
                    self.x, self.y, partition, dtype=dtype, device=device, batch_ids=sel
                )

            total = add(total, self.cache.run(p, k, ids, chunks))
            self.count.computed += len(ids)
        return total

    def with_cache(self, cache_bytes: int) -> LocalRows:
        return LocalRows(self.x, self.y, cache_bytes, self.count)


class FixedChunks:
    """Chunks already gathered (the warm-up's minibatches): a pass sums over them as given."""

    def __init__(self, chunks: Sequence[Chunk]):
        self.chunks = list(chunks)
        self.count = PassCount()

    def reduce(self, p: Pass, partition, batch_ids, dtype, device) -> Sums | None:
        return sum_chunks(p, self.chunks)

    def with_cache(self, cache_bytes: int) -> FixedChunks:
        return self
