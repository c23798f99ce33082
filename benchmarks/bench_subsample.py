"""Fidelity of a subsampled Hessian: scores with H from a fraction of the batches vs all.

    python benchmarks/bench_subsample.py          # the demo's shapes embeddings (ecif-tiny)

Prints, per fraction, the Spearman and Pearson correlation of the influence scores with the
full-Hessian scores, the cosine between the two w = H^-1 g_val, and the overlap of the top 10%.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import pearsonr, spearmanr

import ecif
from ecif.engine.influence import loss_gradient


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    a = ap.parse_args()
    train, val = ecif.datasets.shapes_sets(n=a.n, noise=0.2, n_val=500)
    head = ecif.fit(train, batch_size=256)
    g = loss_gradient(head, val.image, val.text)
    full = ecif.solver(head, train, method="cg", tol=1e-8)
    w_full = full.solve(g)
    ref = ecif.score(head, train, val, inverse=full)["influence"].to_numpy()
    k = len(ref) // 10
    top_ref = set(np.argsort(ref)[:k])
    nb = head.partition.num_batches
    print(f"N={len(train)}, {nb} batches, d={train.d_image}")
    for f in a.fractions:
        sub = ecif.solver(head, train, method="cg", tol=1e-8, hessian_batches=max(1, int(f * nb)))
        w = sub.solve(g)
        s = ecif.score(head, train, val, inverse=sub)["influence"].to_numpy()
        cos = float((w @ w_full) / (w.norm() * w_full.norm()))
        overlap = len(top_ref & set(np.argsort(s)[:k])) / k
        print(
            f"Hessian on {max(1, int(f * nb))}/{nb} batches: Spearman {spearmanr(s, ref)[0]:.3f}, "
            f"Pearson {pearsonr(s, ref)[0]:.3f}, cos(w) {cos:.3f}, top-10% overlap {overlap:.2f}"
        )


if __name__ == "__main__":
    main()
