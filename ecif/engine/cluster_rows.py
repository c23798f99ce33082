"""The pairs held in the memory of Dask workers: the head's fit and solve as map-reduce.

Each block of the partition (``ecif.engine.row_sums``) is loaded once onto a worker by a task
and stays there: its rows are gathered on the driver from the arrays given, or read on the
worker by a ``loader`` (e.g. from the embedding folder's files). Every pass then submits one
task per block, run by the worker that holds it, which returns the block's sums; the driver
adds them in block order, so results are bitwise those of ``LocalRows`` whatever the number
of workers. A worker that dies loses its blocks: Dask reruns their load tasks elsewhere and
retries the pass's tasks (up to ``RETRIES`` times), so the result does not change.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ecif.distributed import RETRIES
from ecif.engine.batches import Partition, iter_chunks
from ecif.engine.head import Head
from ecif.engine.influence import score_pass
from ecif.engine.row_sums import (
    ChunkCache,
    Pass,
    PassCount,
    Sums,
    add,
    block_batches,
    blocks_of,
    num_blocks,
)

KEPT_PARTITIONS = 2  # partitions whose blocks stay on the workers (the fit's, a refit's)
Loader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # rows -> (image, text)


class HeldBlock:
    """One block's rows on a worker, re-indexed from 0, with the worker's chunk cache (not
    sent along when Dask moves the block: a moved block starts with an empty cache)."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, rows: np.ndarray, index: np.ndarray, batch_size: int
    ):
        self.x, self.y = x, y
        self.rows = rows  # their positions in the training set
        self.partition = Partition(index=index, batch_size=batch_size, seed=0, n=len(x))
        self.cache: ChunkCache | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "cache": None}

    def cache_for(self, budget: int) -> ChunkCache:
        if self.cache is None or self.cache.budget != budget:
            self.cache = ChunkCache(budget)
        return self.cache


def _local(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows the block reads, its batches re-indexed to positions in those rows)."""
    rows = index[index >= 0]
    local = np.full(index.shape, -1, dtype=np.int64)
    local[index >= 0] = np.arange(len(rows))
    return rows, local


def hold_arrays(
    x: np.ndarray, y: np.ndarray, rows: np.ndarray, index: np.ndarray, batch_size: int
) -> HeldBlock:
    """A block from rows gathered on the driver (they travel inside the task)."""
    return HeldBlock(x, y, rows, index, batch_size)


def hold_loaded(loader: Loader, rows: np.ndarray, index: np.ndarray, batch_size: int) -> HeldBlock:
    """A block whose rows the worker reads itself."""
    x, y = loader(rows)
    return HeldBlock(x, y, rows, index, batch_size)


def score_block(
    block: HeldBlock, head: Head, w: torch.Tensor, neg: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scoring pass over a held block: (training-set rows, dPos, dNeg)."""
    d_pos, d_neg = score_pass(
        replace(head, partition=block.partition), block.x, block.y, w, neg=neg
    )
    return block.rows, d_pos, d_neg


def reduce_block(
    block: HeldBlock, p: Pass, ids: np.ndarray, dtype: torch.dtype, cache_bytes: int
) -> Sums | None:
    """A pass over some of a held block's batches (``ids`` re-indexed to the block)."""

    def chunks(sel: np.ndarray):
        return iter_chunks(block.x, block.y, block.partition, dtype=dtype, batch_ids=sel)

    return block.cache_for(cache_bytes).run(p, 0, ids, chunks)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value


class ClusterRows:
    """Training pairs kept by the workers of a Dask ``client``: pass it as ``rows`` (to
    ``ecif.fit``, ``ecif.solver``, ``ecif.score``) and every pass over the pairs runs there.

    ``x``, ``y``: the row arrays (the driver gathers each block's rows once, and keeps using
    the arrays for what is not a pass: the whitening's row sample, the warm-up). ``loader``:
    instead of sending rows, each worker calls ``loader(rows)`` for its blocks' rows
    (picklable; ``ecif.data.row_reader.FolderRowReader`` reads an embedding folder). The
    workers compute in float on the CPU.
    """

    def __init__(
        self,
        client,
        x=None,
        y=None,
        *,
        loader: Loader | None = None,
        cache_bytes: int = 0,
        _store: OrderedDict | None = None,
        _count: PassCount | None = None,
    ):
        if loader is None and (x is None or y is None):
            raise ValueError("ClusterRows needs the row arrays or a loader")
        self.client, self.x, self.y, self.loader = client, x, y, loader
        self.cache_bytes = cache_bytes
        self._store: OrderedDict = OrderedDict() if _store is None else _store
        self.count = PassCount() if _count is None else _count

    def with_cache(self, cache_bytes: int) -> ClusterRows:
        """The same held blocks; the workers keep chunks of keyed passes up to this budget
        (per block)."""
        return ClusterRows(
            self.client,
            self.x,
            self.y,
            loader=self.loader,
            cache_bytes=cache_bytes,
            _store=self._store,
            _count=self.count,
        )

    def blocks(self, partition: Partition) -> dict[int, Any]:
        """Futures of the partition's held blocks, loading them on first use."""
        key = hashlib.sha1(partition.index.tobytes()).hexdigest() + f":{partition.batch_size}"
        if key in self._store:
            self._store.move_to_end(key)
            return self._store[key]
        held = {}
        for k in range(num_blocks(partition)):
            index = partition.index[block_batches(partition, k)]
            rows, local = _local(index)
            name = f"ecif-block-{key[:12]}-{k}"
            if self.loader is not None:
                args = (hold_loaded, self.loader, rows, local, partition.batch_size)
            else:
                x, y = np.asarray(self.x[rows]), np.asarray(self.y[rows])
                args = (hold_arrays, x, y, rows, local, partition.batch_size)
            held[k] = self.client.submit(*args, key=name, pure=False, retries=RETRIES)
        self._store[key] = held
        while len(self._store) > KEPT_PARTITIONS:
            self._store.popitem(last=False)  # the futures go: the workers free the blocks
        return held

    def reduce(
        self,
        p: Pass,
        partition: Partition,
        batch_ids: np.ndarray | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Sums | None:
        held = self.blocks(partition)
        p = Pass(p.kernel, _to_cpu(p.args), p.prepare, _to_cpu(p.prepare_args), p.cache_key)
        budget = self.cache_bytes // max(1, len(held))  # the whole cache over the blocks
        parts = blocks_of(partition, batch_ids)
        futures = [
            self.client.submit(
                reduce_block,
                held[k],
                p,
                ids - block_batches(partition, k)[0],
                dtype,
                budget,
                pure=False,
                retries=RETRIES,
            )
            for k, ids in parts
        ]
        self.count.computed += sum(len(ids) for _, ids in parts)
        total = None
        for part in self.client.gather(futures):
            total = add(total, part)
        return total

    def score(
        self,
        head: Head,
        w: torch.Tensor,
        *,
        neg: str = "exact",
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``ecif.engine.influence.score_pass`` with every block scored where it is held."""
        from dask.distributed import as_completed

        held = self.blocks(head.partition)
        light = replace(head, m=head.m.cpu(), m0=head.m0.cpu(), partition=None, info={})
        futures = {
            self.client.submit(score_block, f, light, w.cpu(), neg, pure=False, retries=RETRIES): k
            for k, f in held.items()
        }
        n = head.partition.n
        d_pos, d_neg = np.full(n, np.nan), np.full(n, np.nan)
        for fut in as_completed(futures):
            rows, p, q = fut.result()
            d_pos[rows], d_neg[rows] = p, q
            if progress is not None:
                k = futures[fut]
                progress(len(block_batches(head.partition, k)))
        return d_pos, d_neg

    def close(self) -> None:
        """Release the held blocks (the workers free their memory)."""
        self._store.clear()
