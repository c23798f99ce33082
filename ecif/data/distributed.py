"""Dask path of ``ecif.embed``: one task per input shard, parts written by the workers.

Parts are independent and published atomically, so tasks need no coordination: each worker
loads the model once (cached per process), embeds its shard into the shared output folder and
returns the counts; the client writes the manifest as results arrive. Input and output paths
must be visible to every worker (a shared filesystem). Tasks run through the one Dask driver,
``ecif.distributed.run_tasks``; without a scheduler address its in-process cluster is used
(threads of this process, no sockets), so the model is loaded once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ecif.data.embed_stream import run_parts
from ecif.data.models import LoadedModel, load_model
from ecif.data.readers import Shard, open_shard
from ecif.distributed import run_tasks

_MODELS: dict[tuple, LoadedModel] = {}
_LOCK = threading.Lock()


def _model(load: dict[str, Any]) -> LoadedModel:
    key = tuple(sorted(load.items()))
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_model(**load)
        return _MODELS[key]


def embed_shard_task(
    k: int,
    path: str,
    out: str,
    load: dict[str, Any],
    cols: dict[str, Any],
    batch_size: int,
    chunk_rows: int | None,
    cache_features: str | None = None,
    cache_blocks: int = 1,
) -> tuple[int, int, int, dict[str, int]]:
    """Embed one shard as part ``k`` of ``out`` (with its feature cache when
    ``cache_features``); returns (k, ok, failed, error kinds)."""
    lm = _model(load)
    shard = open_shard(Path(path), **cols)
    got: list[tuple] = []
    # DataLoader workers cannot start inside daemonic Dask workers: decode in the task
    run_parts([(k, shard)], lm, Path(out), batch_size=batch_size, num_workers=0,
              chunk_rows=chunk_rows, on_done=lambda *a: got.append(a),
              cache_features=cache_features, cache_blocks=cache_blocks)  # fmt: skip
    return got[0]


def run_dask(
    pending: Sequence[tuple[int, Shard]],
    out: Path,
    load: dict[str, Any],
    cols: dict[str, Any],
    *,
    scheduler: str | None = None,
    batch_size: int = 256,
    chunk_rows: int | None = None,
    progress: bool = False,
    on_done: Callable[[int, int, int, dict[str, int]], None] | None = None,
    cache_features: str | None = None,
    cache_blocks: int = 1,
) -> None:
    """Submit one task per pending shard and report each finished part to ``on_done``;
    ``cache_features`` as in ``run_parts`` (each task writes its part's features)."""
    from tqdm import tqdm

    args = [
        (
            k,
            str(sh.path),
            str(out),
            load,
            cols,
            batch_size,
            chunk_rows,
            cache_features,
            cache_blocks,
        )
        for k, sh in pending
    ]
    keys = [f"ecif-embed-{k}-{sh.path.name}" for k, sh in pending]
    with tqdm(total=len(args), disable=not progress, unit="shard", desc="embedding") as bar:

        def finished(_: int, result: tuple) -> None:
            if on_done:
                on_done(*result)
            bar.update(1)

        run_tasks(embed_shard_task, args, scheduler, keys=keys, on_result=finished, processes=False)
