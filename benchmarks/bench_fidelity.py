"""Fidelity to real retraining at the DEFAULT head, across embedding geometries.

    python benchmarks/bench_fidelity.py                    # 2 geometries x 3 seeds, n=600
    python benchmarks/bench_fidelity.py --geometries rotated --seeds 1  # another geometry

For each cell: a noisy training set (20% mixed noise) and a clean validation set, the head
an audit chooses by default (``ecif.audit.selection.choose_head``) and, for comparison, the
pre-selection head (logit scale 100, lam 1e-3). Influence is scored once; then real refits
(warm-started, same batches, float64) after removing single pairs and random 5% subsets
give the actual change of validation loss. Prints Spearman(predicted, actual) for single
removals and the LDS (Spearman over subsets of the summed prediction).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from bench_detect import markdown
from scipy.stats import spearmanr

import ecif
from ecif.audit.selection import choose_head


def sets(geometry: str, seed: int, n: int, d: int):
    if geometry == "rotated":
        x, y, _ = ecif.datasets.rotated_pairs(n, d, noise=0.2, seed=seed)
        xv, yv, _ = ecif.datasets.rotated_pairs(300, d, noise=0.0, seed=seed + 1000)
    else:
        x, y, _ = ecif.datasets.concept_pairs(n, d, 0.2, "mixed", seed=seed, geometry=geometry)
        xv, yv, _ = ecif.datasets.concept_pairs(300, d, 0.0, seed=seed + 1000, geometry=geometry)
    return ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)


def study(train, val, scale: float, lam: float, seed: int, singles: int, groups: int) -> dict:
    kw = dict(batch_size=64, seed=seed, lam=lam, logit_scale=scale, dtype="float64", newton_steps=3)
    head = ecif.fit(train, **kw)
    base = head.loss(val)
    pred = ecif.score(head, train, val)["influence"].to_numpy()
    rng = np.random.default_rng(seed)
    n = len(train)
    rem = rng.choice(n, singles, replace=False)
    actual = [ecif.fit(train, exclude=[r], init=head, **kw).loss(val) - base for r in rem]
    subsets = [rng.choice(n, int(0.05 * n), replace=False) for _ in range(groups)]
    group = [ecif.fit(train, exclude=s, init=head, **kw).loss(val) - base for s in subsets]
    return {
        "spearman (single)": spearmanr(pred[rem], actual)[0],
        "LDS (5% subsets)": spearmanr([pred[s].sum() for s in subsets], group)[0],
        "converged": bool(head.info.get("converged")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--geometries", nargs="+", default=["clip_like", "aligned"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--singles", type=int, default=30)
    ap.add_argument("--groups", type=int, default=20)
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for geo in args.geometries:
        for seed in range(args.seeds):
            train, val = sets(geo, seed, args.n, args.d)
            choice = choose_head(train, val, batch_size=64, seed=seed)
            for name, scale, lam in (
                ("default (auto)", choice.logit_scale, choice.lam),
                ("before (100, 1e-3)", 100.0, 1e-3),
            ):
                res = study(train, val, scale, lam, seed, args.singles, args.groups)
                rows.append(
                    {"geometry": geo, "seed": seed, "head": name, "scale": scale, "lam": lam, **res}
                )
            print(f"done {geo} seed={seed} ({time.time() - t0:.0f} s)", flush=True)
    df = pd.DataFrame(rows)
    cols = ["spearman (single)", "LDS (5% subsets)"]
    g = df.groupby(["geometry", "head"], sort=False)
    out = g[cols].mean().round(3).astype(str)
    for c in cols:
        out[c] += (
            " [" + g[c].min().round(3).astype(str) + ", " + g[c].max().round(3).astype(str) + "]"
        )
    out["scale (mean)"] = g["scale"].mean().round(2)
    out["converged"] = g["converged"].all()
    print("\n## Fidelity to retraining (mean [min, max] over seeds)\n")
    print(markdown(out.reset_index()))
    print(f"\n{args.seeds} seeds, n={args.n}, d={args.d}, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
