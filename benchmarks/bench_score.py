"""Throughput of the one-pass ECIF scoring against this machine's own fp32 matmul rate.

    python benchmarks/bench_score.py            # 1,000,000 pairs, d = 512, batch 256
    python benchmarks/bench_score.py --n 100000

Prints pairs/s, the scoring pass's achieved FLOP rate as a fraction of a plain fp32 matmul
measured in the same process, the time of the w = H^-1 g solve (CG with the EK-FAC
preconditioner on a Hessian subsample), and peak memory above the embeddings themselves.
The head is a random perturbation of the identity, not fit: the cost of a scoring pass does
not depend on the values of M, and fitting 1M pairs is not what this measures.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from ecif.engine.batches import make_partition
from ecif.engine.head import Head
from ecif.engine.influence import loss_gradient, score_pass
from ecif.engine.inverse_hessian import InverseHessian, SolverArgs


def matmul_rate(d: int, rows: int = 8192, reps: int = 20) -> float:
    """Sustained fp32 GFLOP/s of (rows x d) @ (d x 2d), the shape that dominates scoring."""
    a = torch.randn(rows, d)
    b = torch.randn(d, 2 * d)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    dt = time.perf_counter() - t0
    return 2.0 * rows * d * 2 * d * reps / dt / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1_000_000, help="number of synthetic pairs")
    ap.add_argument("--d", type=int, default=512, help="embedding width")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--hessian-batches", type=int, default=100, help="batches in the Hessian subsample"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rss0 = peak_rss_mb()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.n, args.d, generator=g)  # built in place: no N x d temporaries,
    x /= x.norm(dim=1, keepdim=True)  # so peak memory reflects the solve and the scoring
    y = torch.randn(args.n, args.d, generator=g).mul_(0.8).add_(x)
    y /= y.norm(dim=1, keepdim=True)
    emb_mb = (x.numel() + y.numel()) * 4 / 2**20
    m0 = torch.eye(args.d)
    head = Head(
        m=m0 + 0.01 * torch.randn(args.d, args.d, generator=g),
        m0=m0,
        log_scale=float(np.log(100.0)),
        log_scale0=float(np.log(100.0)),
        learn_scale=False,
        lam=1e-3,
        partition=make_partition(args.n, args.batch_size, args.seed),
        n_norm=args.n,
    )
    rate = matmul_rate(args.d)
    print(f"machine fp32 matmul: {rate:.1f} GFLOP/s  (threads={torch.get_num_threads()})")

    gval = loss_gradient(head, x[:4096], y[:4096])
    t0 = time.perf_counter()
    inv = InverseHessian(
        head, x, y, SolverArgs(solver="cg", hessian_batches=args.hessian_batches, tol=1e-4)
    )
    t_build = time.perf_counter() - t0
    w = inv.solve(gval)
    t_solve = time.perf_counter() - t0
    print(
        f"w = H^-1 g: {t_solve:.1f} s (EK-FAC build {t_build:.1f} s, CG iterations "
        f"{inv.info.get('cg_iterations')}, rel. residual {inv.info.get('cg_rel_residual', 0):.1e}, "
        f"Hessian on {inv.info['hessian_batches']} of {head.partition.num_batches} batches)"
    )

    t0 = time.perf_counter()
    d_pos, d_neg = score_pass(head, x, y, w)
    t_pass = time.perf_counter() - t0
    b, d, nb = args.batch_size, args.d, head.partition.num_batches
    flops = nb * (4.0 * b * d * d + 4.0 * b * b * d)  # X[M|W] and two B x d x B products
    achieved = flops / t_pass / 1e9
    assert np.isfinite(d_pos).all() and np.isfinite(d_neg).all()
    print(f"scoring pass: {args.n} pairs in {t_pass:.1f} s = {args.n / t_pass:,.0f} pairs/s")
    print(f"scoring FLOP rate: {achieved:.1f} GFLOP/s = {achieved / rate:.0%} of the matmul rate")
    print(
        f"peak RSS: {peak_rss_mb():.0f} MB; embeddings {emb_mb:.0f} MB; "
        f"above embeddings and start: {peak_rss_mb() - rss0 - emb_mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
