"""Fit + solve + score in-process and on a Dask LocalCluster (127.0.0.1) with 1 and 2 workers.

    python benchmarks/bench_distributed.py --shards 8 --rows 25000 --d 128

Writes an embedding folder of CLIP-like pairs (fp16, ``--shards`` parts), then runs each stage
of an audit with a validation set: the head fit (L-BFGS, no warm-up), the solve w = H^-1 g_val
(CG, EK-FAC preconditioned) and the scoring pass. In-process the passes read the training
set from this process (one torch thread, as each single-threaded Dask worker has); on the
cluster every pass runs on the workers, which read their blocks' rows from the folder
(``ecif.ClusterRows`` with ``FolderRowReader``). Prints the seconds per stage, their ratio to
the in-process run, the passes, and whether the head, w and every score are bitwise equal to
the in-process ones.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ecif
from ecif.audit.shards import load_training_set
from ecif.data import layout
from ecif.data.row_reader import FolderRowReader
from ecif.datasets import clip_like_pairs
from ecif.distributed import open_client
from ecif.engine.influence import score_pass


def make_folder(root: Path, shards: int, rows: int, d: int, seed: int = 0) -> Path:
    folder = root / "emb"
    image, text, _ = clip_like_pairs(shards * rows, d, seed=seed)
    for k in range(shards):
        sl = slice(k * rows, (k + 1) * rows)
        meta = pd.DataFrame({"key": [f"s{k}-{i}" for i in range(rows)], "status": "ok"})
        x, y = (np.asarray(a[sl], dtype=np.float16) for a in (image, text))
        layout.write_part(folder, k, x, y, meta, {"source": f"{k:05d}.parquet"})
    parts = [{"index": k, "source": f"{k:05d}.parquet"} for k in range(shards)]
    layout.write_manifest(folder, {"id_column": "key", "parts": parts})
    return folder


def run(train, val, fit_kw: dict, rows=None) -> dict:
    out: dict = {}
    t0 = time.perf_counter()
    head = ecif.fit(train, rows=rows, **fit_kw)
    out["fit"] = time.perf_counter() - t0
    g = ecif.loss_gradient(head, val)
    t0 = time.perf_counter()
    inv = ecif.solver(head, train, solver="cg", rows=rows)
    w = inv.solve(g)
    out["solve"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if rows is None:
        d_pos, d_neg = score_pass(head, train.image, train.text, w)
    else:
        d_pos, d_neg = rows.score(head, w)
    out["score"] = time.perf_counter() - t0
    scores = np.stack([d_pos, d_neg])
    out.update(head=head, w=w, scores=scores, passes=head.info["evaluations"])
    out["cg"] = inv.info["cg_iterations"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=25000, help="pairs per shard")
    ap.add_argument("--d", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(1)
    fit_kw = dict(batch_size=256, logit_scale=30.0, lam=1e-3, warmup_epochs=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp), a.shards, a.rows, a.d)
        train = load_training_set(folder)
        val = ecif.EmbeddingSet(*clip_like_pairs(2000, a.d, rows_seed=1)[:2])
        results = {"in-process": run(train, val, fit_kw)}
        for workers in (1, 2):
            with open_client(workers=workers) as client:
                rows = ecif.ClusterRows(
                    client, train.image, train.text, loader=FolderRowReader(folder)
                )
                results[f"dask, {workers} worker(s)"] = run(train, val, fit_kw, rows)
    base = results["in-process"]
    n = a.shards * a.rows
    print(
        f"{n:,} pairs, d = {a.d}, {a.shards} shards; fit {base['passes']} passes, CG {base['cg']}"
    )
    print(
        f"{'run':20s} {'fit s':>8s} {'solve s':>8s} {'score s':>8s} {'total/in-process':>17s}  equal"
    )
    for name, r in results.items():
        total = r["fit"] + r["solve"] + r["score"]
        ratio = total / (base["fit"] + base["solve"] + base["score"])
        same = (
            torch.equal(r["head"].m, base["head"].m)
            and torch.equal(r["w"], base["w"])
            and np.array_equal(r["scores"], base["scores"])
        )
        print(
            f"{name:20s} {r['fit']:8.1f} {r['solve']:8.1f} {r['score']:8.1f} {ratio:17.2f}  {same}"
        )
    one, two = results["dask, 1 worker(s)"], results["dask, 2 worker(s)"]
    for stage in ("fit", "solve", "score"):
        print(f"speed-up of 2 workers over 1, {stage}: {one[stage] / two[stage]:.2f}x")


if __name__ == "__main__":
    main()
