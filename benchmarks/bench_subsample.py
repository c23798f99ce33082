"""Fidelity of a subsampled Hessian: scores with H from a subset of the batches vs all.

    python benchmarks/bench_subsample.py                       # demo shapes (ecif-tiny, d = 64)
    python benchmarks/bench_subsample.py --synthetic 20480 256 --batches 16 32 64

Prints, per subsample, the Spearman and Pearson correlation of the influence scores with the
full-Hessian scores, the cosine between the two w = H^-1 g_val, the overlap of the top 10% and
top 1%, and the solve's wall time and CG iterations (both solves: CG with EK-FAC
preconditioning to ``--tol``). ``--synthetic N D``: rotated unit pairs with 20% shuffled
captions (``ecif.datasets.rotated_pairs``), float32, CLIP's logit scale 100, L-BFGS fit.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

import ecif
from ecif.datasets import rotated_pairs
from ecif.engine.influence import loss_gradient


def problem(a):
    if a.synthetic is None:
        train, val = ecif.datasets.shapes_sets(n=a.n, noise=0.2, n_val=500)
        return train, val, ecif.fit(train, batch_size=256)
    n, d = a.synthetic
    x, y, _ = rotated_pairs(n, d, noise=0.2, seed=a.seed)
    xv, yv, _ = rotated_pairs(4096, d, noise=0.0, seed=a.seed + 1)
    train = ecif.EmbeddingSet(x.astype(np.float32), y.astype(np.float32))
    val = ecif.EmbeddingSet(xv.astype(np.float32), yv.astype(np.float32))
    head = ecif.fit(
        train, batch_size=256, seed=a.seed, lam=1e-3, dtype="float32", max_iter=a.fit_iter
    )
    return train, val, head


def timed_solver(head, train, g, **kw):
    t0 = time.perf_counter()
    inv = ecif.solver(head, train, **kw)
    w = inv.solve(g)
    return inv, w, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4000, help="shapes pairs (demo data)")
    ap.add_argument("--synthetic", type=int, nargs=2, metavar=("N", "D"), default=None)
    ap.add_argument("--fit-iter", type=int, default=100, help="L-BFGS budget (synthetic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-6, help="CG relative residual")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="absolute counts")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    train, val, head = problem(a)
    g = loss_gradient(head, val.image, val.text)
    full, w_full, sec_full = timed_solver(head, train, g, solver="cg", tol=a.tol)
    ref = ecif.score(head, train, val, inverse=full)["influence"].to_numpy()
    tops = {p: set(np.argsort(ref)[: max(1, int(p * len(ref)))]) for p in (0.1, 0.01)}
    nb = head.partition.num_batches
    print(
        f"N={len(train):,}, {nb} batches of {head.batch_size}, d={train.d_image}, "
        f"t={head.logit_scale:g}, lambda={head.lam:g}; full Hessian: {sec_full:.1f} s, "
        f"{full.info.get('cg_iterations')} CG iterations\n"
    )
    print(
        "| Hessian on | pairs | Spearman | Pearson | cos(w) | top 10% | top 1% | solve s | CG it |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    counts = a.batches or [max(1, int(f * nb)) for f in a.fractions]
    for k in counts:
        if k >= nb:
            continue
        sub, w, sec = timed_solver(head, train, g, solver="cg", tol=a.tol, hessian_batches=k)
        s = ecif.score(head, train, val, inverse=sub)["influence"].to_numpy()
        cos = float((w @ w_full) / (w.norm() * w_full.norm()))
        over = {p: len(t & set(np.argsort(s)[: len(t)])) / len(t) for p, t in tops.items()}
        print(
            f"| {k} / {nb} batches | {k * head.batch_size:,} | {spearmanr(s, ref)[0]:.3f} "
            f"| {pearsonr(s, ref)[0]:.3f} | {cos:.3f} | {over[0.1]:.2f} | {over[0.01]:.2f} "
            f"| {sec:.1f} | {sub.info.get('cg_iterations')} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
