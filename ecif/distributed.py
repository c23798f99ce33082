"""The one Dask driver: a client (``open_client``) and independent per-shard tasks on it
(``run_tasks``), for ``ecif embed``, ``ecif score`` and the fit and solve on a cluster.

Each task writes its own output atomically, so a task retried after a worker dies (up to
``RETRIES`` times) leaves exactly one copy of its shard's rows. Without a scheduler address
a ``LocalCluster`` on 127.0.0.1 lives for the duration of the call: worker processes by
default, or threads of this process (``processes=False``: in-process comms) for tasks that
keep a large model in memory. Whatever a local cluster listens on is bound to 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

RETRIES = 2  # a task whose worker died is resubmitted up to this many times
# Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which sends every large
# temporary through mmap: the head's passes ran 1.6-2.5x slower in such a worker than in
# this process (100k pairs, d = 64). Local clusters start without it; on a cluster of your
# own, set this key to null in the workers' Dask config.
TRIM_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
LOOPBACK = "127.0.0.1:0"  # where a local cluster's HTTP servers listen (a free port)


@contextmanager
def open_client(
    scheduler: str | None = None, *, processes: bool = True, workers: int = 2
) -> Iterator[Any]:
    """A Dask client: of the scheduler at ``scheduler`` (``tcp://host:port``), or of a
    ``LocalCluster`` on 127.0.0.1 that lives as long as the block (``processes``: ``workers``
    single-threaded worker processes, else one worker of two threads in this process)."""
    try:
        import dask
        from dask.distributed import Client, LocalCluster
    except ImportError as err:  # pragma: no cover - the extra is part of dev installs
        raise RuntimeError(
            "--distributor dask needs the dask extra: pip install 'ecif[dask]'"
        ) from err
    cluster = None
    if scheduler is None:
        if processes:  # tcp on 127.0.0.1 only
            local = {"host": "127.0.0.1", "n_workers": workers, "threads_per_worker": 1}
        else:  # inproc://, no sockets (a host would ask for tcp)
            local = {"n_workers": 1, "threads_per_worker": 2}
        # Dask's HTTP servers (scheduler and workers) otherwise listen on 0.0.0.0 when the
        # cluster runs in this process: loopback only, any free port
        loopback = {"dashboard_address": LOOPBACK, "worker_dashboard_address": LOOPBACK}
        with dask.config.set({TRIM_KEY: None}):
            cluster = LocalCluster(processes=processes, **loopback, **local)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_tasks(
    fn: Callable[..., Any],
    arg_tuples: Sequence[tuple],
    scheduler: str | None = None,
    *,
    keys: Sequence[str] | None = None,
    on_result: Callable[[int, Any], None] | None = None,
    processes: bool = True,
    client: Any = None,
) -> list[Any]:
    """Run ``fn(*args)`` for each tuple as one Dask task; results in the tuples' order.

    ``scheduler``: a ``tcp://host:port`` address of a running scheduler, or None for a local
    cluster (``open_client``; ``processes`` as there); ``client``: one already open instead.
    ``keys``: task names (the dashboard shows them). ``on_result(i, result)`` is called in
    the caller's thread as each task finishes.
    """
    if not arg_tuples:
        return []
    if client is None:
        with open_client(scheduler, processes=processes) as opened:
            return run_tasks(fn, arg_tuples, keys=keys, on_result=on_result, client=opened)
    from dask.distributed import as_completed

    futures = [
        client.submit(fn, *a, pure=False, retries=RETRIES, **({"key": keys[i]} if keys else {}))
        for i, a in enumerate(arg_tuples)
    ]
    order = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    for fut in as_completed(futures):
        i = order[fut.key]
        results[i] = fut.result()
        if on_result is not None:
            on_result(i, results[i])
    return results
