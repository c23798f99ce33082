"""Fit cost with and without whitened L-BFGS (ecif/engine/precondition.py).

    python benchmarks/bench_fit.py --n 30000 --d 128
    python benchmarks/bench_fit.py --n 100000 --d 256 --data clip_like rotated

For each synthetic set, fits the head (float32, L-BFGS, batch 256, CLIP's logit scale 100,
lambda 1e-3, the default tolerance 1e-5 on the gradient's max-abs) with whitening on and off,
in the same process, and prints full passes, wall seconds, the final gradient and the
relative difference of the two heads. ``clip_like``: anisotropic pairs like CLIP's (shared
mean direction, 1/k spectrum, clusters); ``rotated``: isotropic unit pairs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import ecif
from ecif.datasets import clip_like_pairs, rotated_pairs

DATA = {
    "clip_like": lambda n, d, s: clip_like_pairs(n, d, seed=s),
    "rotated": lambda n, d, s: rotated_pairs(n, d, seed=s),
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=30000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--data", nargs="+", default=["clip_like", "rotated"], choices=list(DATA))
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--warmup-epochs", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(
        f"N={a.n:,}, d={a.d}, float32, {torch.get_num_threads()} threads, L-BFGS max_iter "
        f"{a.max_iter}, warm-up epochs {a.warmup_epochs}\n"
    )
    print("| data | whiten | passes | iterations | wall s | grad max | converged | rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.data:
        x, y, _ = DATA[name](a.n, a.d, a.seed)
        x, y = x.astype(np.float32), y.astype(np.float32)
        heads = {}
        for whiten in (False, True):
            t0 = time.perf_counter()
            h = ecif.fit(
                (x, y),
                optimizer="lbfgs",
                whiten=whiten,
                max_iter=a.max_iter,
                warmup_epochs=a.warmup_epochs,
                seed=a.seed,
            )
            sec = time.perf_counter() - t0
            heads[whiten] = h
            diff = ""
            if whiten:
                m0 = heads[False].m
                diff = f"{float((h.m - m0).abs().max() / m0.abs().max()):.1e}"
            print(
                f"| {name} | {'on' if whiten else 'off'} | {h.info['evaluations']} "
                f"| {h.info['iterations']} | {sec:.1f} | {h.info['grad_max']:.1e} "
                f"| {h.info['converged']} | {diff} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
