"""Kill a Dask worker while it runs a task: how the retry tests make a worker die mid-work."""

import os
import signal
import threading
import time
from contextlib import contextmanager


@contextmanager
def killing_one_busy_worker(client, poll: float = 0.05, timeout: float = 60.0):
    """While the block runs, SIGKILL the first worker seen processing a task (once). Yields
    the list that receives its address (empty if no worker was ever busy)."""
    pids = client.run(os.getpid)
    killed: list[str] = []

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline and not killed:
            busy = [w for w, tasks in client.processing().items() if tasks]
            if busy:
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(poll)

    killer = threading.Thread(target=watch)
    killer.start()
    try:
        yield killed
    finally:
        killer.join()
