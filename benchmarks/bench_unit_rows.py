"""Embeddings that are not L2-normalised: the default audit on unit rows, on the same rows
scaled to random norms, and on those scaled rows left as they are (the behaviour before an
audit divided them by their norms; ``as_unit`` patched to pass them through).

    python benchmarks/bench_unit_rows.py                      # 2 geometries x 3 seeds
    python benchmarks/bench_unit_rows.py --low 0.7 --high 1.3 # a milder spread of norms

Each cell: 1,500 concept pairs (20% mixed noise) and 400 clean validation pairs, d = 64,
``ecif.Auditor(train, val).run()`` with default options; training and validation rows both
scaled, each row by its own factor drawn from [low, high]. Prints AP of ``misalign_score``
against the planted noise and the seconds per audit, per seed.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from unittest import mock

import numpy as np

import ecif
import ecif.audit.auditor as auditor_module
from ecif.audit.metrics import average_precision


def audit(x, y, xv, yv, raw: bool) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    keep = mock.patch.object(auditor_module, "as_unit", lambda es, name: (es, None))
    with warnings.catch_warnings(), keep if raw else contextlib.nullcontext():
        warnings.simplefilter("ignore")
        table = ecif.Auditor(ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)).run()
    return table["misalign_score"].to_numpy(), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometries", nargs="+", default=["clip_like", "aligned"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--low", type=float, default=5.0)
    p.add_argument("--high", type=float, default=20.0)
    a = p.parse_args()
    print(
        f"| geometry | seed | unit rows | norms {a.low:g}-{a.high:g} (default) | same, not rescaled |"
    )
    print("|---|---|---|---|---|")
    for geometry in a.geometries:
        for seed in range(a.seeds):
            x, y, frame = ecif.datasets.concept_pairs(
                1500, 64, 0.2, "mixed", seed=seed, geometry=geometry
            )
            xv, yv, _ = ecif.datasets.concept_pairs(
                400, 64, 0.0, seed=seed + 10_000, geometry=geometry
            )
            labels = frame["is_corrupted"].to_numpy()
            g = np.random.default_rng(seed)
            scaled = [v * g.uniform(a.low, a.high, (len(v), 1)) for v in (x, y, xv, yv)]
            cells = []
            for rows, raw in (((x, y, xv, yv), False), (scaled, False), (scaled, True)):
                score, seconds = audit(*rows, raw=raw)
                cells.append(f"{average_precision(labels, score):.4f} ({seconds:.1f} s)")
            print(f"| {geometry} | {seed} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
