"""A local Dask cluster listens on loopback only, in both of its modes (the scheduler's and the
workers' HTTP servers bound 0.0.0.0 when the cluster ran in this process)."""

import os

import psutil
import pytest

from ecif.distributed import open_client


def _listening() -> set[tuple[str, int]]:
    me = psutil.Process(os.getpid())
    procs = [me, *me.children(recursive=True)]
    return {
        (c.laddr.ip, c.laddr.port)
        for p in procs
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


@pytest.mark.parametrize("processes", [False, True])
def test_local_cluster_listens_on_loopback_only(processes):
    before = _listening()
    with open_client(processes=processes, workers=1) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        opened = _listening() - before
    assert opened, "a local cluster serves at least its HTTP routes"
    assert {ip for ip, _ in opened} == {"127.0.0.1"}, opened
