"""Scoring the same shards in-process and on a Dask LocalCluster (127.0.0.1) with 1 and 2 workers.

    python benchmarks/bench_distributed.py --shards 8 --rows 20000 --d 256

Prints wall time per configuration, the speed-up of 2 workers over 1, and whether every
output shard is identical to the in-process run. The head fit and the w solve happen once,
in the client, before the shard tasks; only the per-shard scoring is distributed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from dask.distributed import Client, LocalCluster

import ecif
from ecif.audit import AuditArgs
from ecif.audit.shards import score_shards
from ecif.data import layout


def make_folder(root: Path, shards: int, rows: int, d: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "emb"
    for k in range(shards):
        x = rng.standard_normal((rows, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y = x + 0.8 * rng.standard_normal((rows, d)).astype(np.float32) / np.sqrt(d)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        meta = pd.DataFrame(
            {"key": [f"s{k}-{i}" for i in range(rows)], "caption": "", "status": "ok"}
        )
        layout.write_part(folder, k, x, y, meta, {"source": f"{k:05d}.parquet"})
    parts = [{"index": k, "source": f"{k:05d}.parquet"} for k in range(shards)]
    layout.write_manifest(folder, {"id_column": "key", "parts": parts})
    return folder


def read(folder: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted((folder / "scores").glob("*.parquet"))])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--d", type=int, default=256)
    a = ap.parse_args()
    args = AuditArgs(batch_size=256, threshold=0.1, solver="ekfac")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = make_folder(root, a.shards, a.rows, a.d)
        rng = np.random.default_rng(1)
        xv = rng.standard_normal((2000, a.d)).astype(np.float32)
        xv /= np.linalg.norm(xv, axis=1, keepdims=True)
        val = ecif.EmbeddingSet(xv, xv)
        times = {}
        t0 = time.perf_counter()
        score_shards(folder, root / "local", val, args=args, log=lambda s: None)
        times["in-process"] = time.perf_counter() - t0
        ref = read(root / "local")
        same = {}
        for workers in (1, 2):
            cluster = LocalCluster(
                host="127.0.0.1",
                n_workers=workers,
                threads_per_worker=2 // workers,
                dashboard_address=None,
            )
            with Client(cluster):
                t0 = time.perf_counter()
                score_shards(
                    folder, root / f"dask{workers}", val, args=args, distributor="dask",
                    scheduler=cluster.scheduler_address, log=lambda s: None,
                )  # fmt: skip
                times[f"dask, {workers} worker(s)"] = time.perf_counter() - t0
            cluster.close()
            same[workers] = read(root / f"dask{workers}").equals(ref)
    n = a.shards * a.rows
    for k, v in times.items():
        print(f"{k:20s} {v:7.1f} s  ({n / v:,.0f} pairs/s, fit + solve + scoring)")
    print(
        f"speed-up 2 workers vs 1: {times['dask, 1 worker(s)'] / times['dask, 2 worker(s)']:.2f}x"
    )
    print(f"outputs identical to in-process: 1 worker {same[1]}, 2 workers {same[2]}")


if __name__ == "__main__":
    main()
