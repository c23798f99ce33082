"""Dask path of ``ecif.embed``: one task per input shard, parts written by the workers.

Parts are independent and published atomically, so tasks need no coordination: each worker
loads the model once (cached per process), embeds its shard into the shared output folder and
returns the counts; the client writes the manifest as results arrive. Input and output paths
must be visible to every worker (a shared filesystem). Without a scheduler address an
in-process cluster is used (no sockets).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ecif.data.readers import Shard

_MODELS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def _model(load: dict[str, Any]):
    from ecif.data.models import load_model

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
) -> tuple[int, int, int, dict[str, int]]:
    """Embed one shard as part ``k`` of ``out``; returns (k, ok, failed, error kinds)."""
    from ecif.data.embed import run_parts
    from ecif.data.readers import open_shard

    lm = _model(load)
    shard = open_shard(Path(path), **cols)
    got: list[tuple] = []
    # DataLoader workers cannot start inside daemonic Dask workers: decode in the task
    run_parts([(k, shard)], lm, Path(out), batch_size=batch_size, num_workers=0,
              chunk_rows=chunk_rows, on_done=lambda *a: got.append(a))  # fmt: skip
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
) -> None:
    """Submit one task per pending shard and report each finished part to ``on_done``."""
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(
            processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
        )
        client = Client(cluster)
    try:
        futures = [
            client.submit(
                embed_shard_task,
                k,
                str(sh.path),
                str(out),
                load,
                cols,
                batch_size,
                chunk_rows,
                key=f"ecif-embed-{k}-{sh.path.name}",
                pure=False,
            )  # fmt: skip
            for k, sh in pending
        ]
        with tqdm(total=len(futures), disable=not progress, unit="shard", desc="embedding") as bar:
            for fut in as_completed(futures):
                k, ok, failed, kinds = fut.result()
                if on_done:
                    on_done(k, ok, failed, kinds)
                bar.update(1)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
