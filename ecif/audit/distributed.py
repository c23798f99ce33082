"""Running per-shard tasks on Dask: an existing engine for past-one-machine scale.

Each task writes its own output atomically, so a task retried after a worker dies leaves
exactly one copy of its shard's rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def run_on_dask(
    fn: Callable[..., Any], arg_tuples: Sequence[tuple], scheduler: str | None = None
) -> list[Any]:
    """Run ``fn(*args)`` for each tuple as one Dask task; results in order.

    ``scheduler``: a ``tcp://host:port`` address of a running scheduler, or None for a
    LocalCluster bound to 127.0.0.1 for the duration of the call.
    """
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as err:  # pragma: no cover - the extra is part of dev installs
        raise RuntimeError(
            "--distributor dask needs the dask extra: pip install 'ecif[dask]'"
        ) from err
    if not arg_tuples:
        return []
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(
            host="127.0.0.1", n_workers=2, threads_per_worker=1, dashboard_address=None
        )
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        futures = [client.submit(fn, *a, pure=False, retries=2) for a in arg_tuples]
        return client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
