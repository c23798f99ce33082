"""How accurate the scores are along a CG solve, and what EK-FAC alone gives.

    python benchmarks/bench_solver.py --data clip_like --n 20480 --d 128
    python benchmarks/bench_solver.py --data rotated --n 20480 --d 256

Fits a head (float32, L-BFGS, batch 256, t = 100, lambda = 1e-3), takes w* = H^-1 g_val from CG
(EK-FAC-preconditioned, exact Hessian-vector products) to relative residual 1e-7, and prints,
at chosen iterations of the same CG run, the residual and how the influence scores compare
with w*'s: Spearman, overlap of the 200 most harmful, and the largest error relative to the
largest score. Then EK-FAC alone (no CG), built from all batches and from a sample, against
w*. ``clip_like``: anisotropic CLIP-like pairs (validation drawn from the same generator
call); ``rotated``: isotropic unit pairs. 20% of the training captions are shuffled.
Last, the wall time of a default CG solve with and without the Hessian-vector-product cache.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

import ecif
from ecif.datasets import clip_like_pairs, rotated_pairs
from ecif.engine.influence import score_pass
from ecif.engine.inverse_hessian import InverseHessian, SolverArgs

CHECK = (1, 3, 5, 8, 12, 16, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200)


def problem(a):
    gen = clip_like_pairs if a.data == "clip_like" else rotated_pairs
    x, y, _ = gen(a.n + 4096, a.d, noise=0.0, seed=a.seed)
    x, y = x.astype(np.float32), y.astype(np.float32)
    xv, yv = x[a.n :], y[a.n :]
    x, y = x[: a.n].copy(), y[: a.n].copy()
    bad = np.random.default_rng(a.seed + 5).choice(a.n, a.n // 5, replace=False)
    y[bad] = y[np.roll(bad, 1)]
    head = ecif.fit((x, y), seed=a.seed, lam=1e-3, max_iter=a.fit_iter)
    return head, x, y, ecif.loss_gradient(head, (xv, yv))


def scores(head, x, y, w):
    pos, neg = score_pass(head, x, y, w)
    return pos + neg


def compare(s, ref) -> str:
    k = 200
    over = len(set(np.argsort(s)[:k]) & set(np.argsort(ref)[:k])) / k
    err = np.abs(s - ref).max() / np.abs(ref).max()
    return f"{spearmanr(s, ref)[0]:.4f} | {over:.2f} | {err:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="clip_like", choices=["clip_like", "rotated"])
    ap.add_argument("--n", type=int, default=20480)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--fit-iter", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    head, x, y, g = problem(a)
    inv = InverseHessian(head, x, y, SolverArgs(solver="ekfac", ekfac_batches=None))
    pre = inv.ekfac.apply
    # one preconditioned CG run, keeping the iterates
    xs, rels = [], []
    w, r = torch.zeros_like(g), g.clone()
    z = pre(r[None])[0]
    p, rz = z.clone(), r @ z
    for _ in range(500):
        hp = inv.hvp(p)
        alpha = rz / (p @ hp)
        w, r = w + alpha * p, r - alpha * hp
        xs.append(w.clone())
        rels.append(float(r.norm() / g.norm()))
        if rels[-1] < 1e-7:
            break
        z = pre(r[None])[0]
        rz_new = r @ z
        p, rz = z + (rz_new / rz) * p, rz_new
    ref = scores(head, x, y, xs[-1])
    print(
        f"{a.data}: N={a.n:,}, d={a.d}, {head.partition.num_batches} batches, fit grad "
        f"{head.info['grad_max']:.1e}; CG to 1e-7 took {len(xs)} iterations\n"
    )
    print("| w from | relative residual | Spearman | top-200 kept | max error / max score |")
    print("|---|---|---|---|---|")
    for k in CHECK:
        if k <= len(xs):
            print(
                f"| CG, {k} iterations | {rels[k - 1]:.1e} | {compare(scores(head, x, y, xs[k - 1]), ref)} |"
            )
    nb = head.partition.num_batches
    for k in (None, 256, 64):
        if k is not None and k >= nb:
            continue
        ek = InverseHessian(head, x, y, SolverArgs(solver="ekfac", ekfac_batches=k))
        s = scores(head, x, y, ek.solve(g))
        print(f"| EK-FAC alone, {k or nb} batches | | {compare(s, ref)} |")
    print("\n| CG solve at the default tolerance | wall s | iterations |")
    print("|---|---|---|")
    for _round in range(2):  # interleaved, the second round is the one to read
        for cache in (0, SolverArgs().cache_bytes):
            t0 = time.perf_counter()
            inv = InverseHessian(head, x, y, SolverArgs(solver="cg", cache_bytes=cache))
            inv.solve(g)
            label = "recomputing every product" if cache == 0 else f"cache {cache >> 20} MiB"
            print(
                f"| {label} (round {_round + 1}) | {time.perf_counter() - t0:.2f} "
                f"| {inv.info['cg_iterations']} |"
            )


if __name__ == "__main__":
    main()
