"""A spinner for steps that have no natural count (a fit, a solve): what runs and for how long.

``with step("fitting the head on 1,400 pairs", enabled):`` draws a tqdm line on stderr,
refreshed from a background thread, and leaves ``... done in 12.3 s``. Disabled, it does
nothing. Bars of the step itself (e.g. the L-BFGS passes) appear on the next line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

REFRESH_S = 0.2


@contextmanager
def step(desc: str, enabled: bool = True, file: Any = None) -> Iterator[None]:
    """A spinner line with ``desc`` and the elapsed time while the block runs."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=desc, bar_format="{desc} {elapsed}", file=file, leave=True)
    bar.refresh()
    stop = threading.Event()

    def spin() -> None:
        while not stop.wait(REFRESH_S):
            bar.refresh()

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    start = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join()
        took = time.perf_counter() - start
        bar.bar_format = "{desc}"
        bar.set_description_str(f"{desc}: {'done' if ok else 'stopped'} in {took:.1f} s")
        bar.close()
