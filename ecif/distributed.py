"""The one Dask driver: run independent per-shard tasks, for ``ecif embed`` and ``ecif score``.

Each task writes its own output atomically, so a task retried after a worker dies (up to
``RETRIES`` times) leaves exactly one copy of its shard's rows. Without a scheduler address
a ``LocalCluster`` on 127.0.0.1 lives for the duration of the call: worker processes by
default, or threads of this process (``processes=False``, no sockets) for tasks that keep a
large model in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

RETRIES = 2  # a task whose worker died is resubmitted up to this many times


def run_tasks(
    fn: Callable[..., Any],
    arg_tuples: Sequence[tuple],
    scheduler: str | None = None,
    *,
    keys: Sequence[str] | None = None,
    on_result: Callable[[int, Any], None] | None = None,
    processes: bool = True,
) -> list[Any]:
    """Run ``fn(*args)`` for each tuple as one Dask task; results in the tuples' order.

    ``scheduler``: a ``tcp://host:port`` address of a running scheduler, or None for a local
    cluster (``processes``: two single-threaded worker processes, else one worker of two
    threads in this process). ``keys``: task names (the dashboard shows them).
    ``on_result(i, result)`` is called in the caller's thread as each task finishes.
    """
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as err:  # pragma: no cover - the extra is part of dev installs
        raise RuntimeError(
            "--distributor dask needs the dask extra: pip install 'ecif[dask]'"
        ) from err
    if not arg_tuples:
        return []
    cluster = None
    if scheduler is None:
        if processes:  # tcp on 127.0.0.1 only
            local = {"host": "127.0.0.1", "n_workers": 2, "threads_per_worker": 1}
        else:  # inproc://, no sockets (a host would ask for tcp)
            local = {"n_workers": 1, "threads_per_worker": 2}
        cluster = LocalCluster(processes=processes, dashboard_address=None, **local)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
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
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
