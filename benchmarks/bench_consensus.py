"""What the kNN consensus (``knn_disagreement``) costs an audit, and what IVF costs it in recall.

    python benchmarks/bench_consensus.py                       # N = 20k, 100k; IVF at 50k, 200k
    python benchmarks/bench_consensus.py --sizes 20000 --ivf   # one size, no IVF check
    python benchmarks/bench_consensus.py --sizes --ivf 200000 --nprobe 32 16 8 4

With a validation set, every audit computes each pair's 10 nearest images and 10 nearest
captions over the whole training set (``ecif.data.neighbours``: exact FAISS below 50,000
pairs, IVF above). Per size (synthetic CLIP-like concept pairs, 20% mixed noise, d = --d):
the consensus's seconds beside the whole default audit's in the same process (the audit
includes it), so the printed share is what the fifth signal adds. ``--ivf N ...``: the
consensus from IVF neighbours against exact ones at N pairs, in the same process (time
ratio, recall of the 10 nearest images, the consensus's AP from each), to see whether
approximate neighbours cost ranking quality; ``--nprobe``: the IVF lists each query visits
(one row each; the shipped ``ecif.data.neighbours.NPROBE`` by default).
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
import torch

import ecif
from ecif.audit.auditor import consensus
from ecif.audit.baselines import lemon
from ecif.audit.metrics import ranking_metrics
from ecif.data import neighbours
from ecif.data.neighbours import nearest_rows
from ecif.datasets import concept_pairs


def audit_share(n: int, d: int) -> dict:
    x, y, frame = concept_pairs(n, d, 0.2, "mixed", seed=0)
    xv, yv, _ = concept_pairs(2000, d, 0.0, seed=10_000)
    train, val = ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)
    t0 = time.perf_counter()
    consensus(train)
    t_cons = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = ecif.Auditor(train, val).run()
    t_audit = time.perf_counter() - t0
    labels = frame["is_corrupted"].to_numpy()
    ap = {
        k: ranking_metrics(labels, table[k])["ap"] for k in ("misalign_score", "knn_disagreement")
    }
    return {"n": n, "consensus_s": t_cons, "audit_s": t_audit, "share": t_cons / t_audit, **ap}


def ivf_check(n: int, d: int, nprobes: list[int], k: int = 10) -> list[dict]:
    """The consensus from IVF neighbours, visiting each of ``nprobes`` lists per query, against
    exact ones (both FAISS) on the same pairs: time, recall@k of the images' neighbours, AP."""
    x, y, frame = concept_pairs(n, d, 0.2, "mixed", seed=0)
    labels = frame["is_corrupted"].to_numpy()
    t0 = time.perf_counter()
    exact_ap = ranking_metrics(labels, lemon(x, y, kind="flat"))["ap"]
    exact_s = time.perf_counter() - t0
    _, exact = nearest_rows(x, k, kind="flat")
    out = []
    for nprobe in nprobes:
        with mock.patch.object(neighbours, "NPROBE", nprobe):
            t0 = time.perf_counter()
            ap = ranking_metrics(labels, lemon(x, y, kind="ivf"))["ap"]
            ivf_s = time.perf_counter() - t0
            _, approx = nearest_rows(x, k, kind="ivf")
        recall = float(np.mean((approx[:, :, None] == exact[:, None, :]).any(2)))
        out.append(
            dict(
                n=n,
                nprobe=nprobe,
                flat_s=exact_s,
                ivf_s=ivf_s,
                recall=recall,
                flat_ap=exact_ap,
                ivf_ap=ap,
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="*", default=[20_000, 100_000])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument(
        "--ivf",
        type=int,
        nargs="*",
        default=[50_000, 200_000],
        help="pair counts for the IVF check (none: skip it)",
    )
    ap.add_argument(
        "--nprobe",
        type=int,
        nargs="+",
        default=[neighbours.NPROBE],
        help="IVF lists visited per query in the IVF check (several: one row each)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    print(
        "| pairs | consensus s | whole audit s | consensus share | AP misalign_score | "
        "AP knn_disagreement |\n|---|---|---|---|---|---|",
        flush=True,
    )
    for n in args.sizes:
        r = audit_share(n, args.d)
        print(
            f"| {n:,} | {r['consensus_s']:.1f} | {r['audit_s']:.1f} | {r['share']:.1%} | "
            f"{r['misalign_score']:.4f} | {r['knn_disagreement']:.4f} |",
            flush=True,
        )
    if args.ivf:
        print(
            "\n| pairs | nprobe | exact s | IVF s | IVF / exact | recall@10 | "
            "consensus AP (exact) | consensus AP (IVF) |\n|---|---|---|---|---|---|---|---|",
            flush=True,
        )
    for n in args.ivf:
        for r in ivf_check(n, args.d, args.nprobe):
            print(
                f"| {n:,} | {r['nprobe']} | {r['flat_s']:.1f} | {r['ivf_s']:.1f} | "
                f"{r['ivf_s'] / r['flat_s']:.3f} | {r['recall']:.3f} | {r['flat_ap']:.4f} | "
                f"{r['ivf_ap']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
