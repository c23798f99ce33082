"""Does the head fit reach its tolerance? (issue 13)

    python benchmarks/bench_convergence.py
    python benchmarks/bench_convergence.py --cases clip32 digits --dtypes float32

Fits the head with DEFAULT options (``ecif.fit(train, seed=0, dtype=...)``: tolerance 1e-5
on the gradient's max-abs in float32, 1e-9 in float64) on each case and prints the solver's
iterations and full passes, wall seconds, the gradient it reports, the gradient of the SAME
head re-evaluated in float64 (the fit's own arithmetic cannot flatter itself there), and the
distance to the float64 optimum (max-abs entry of M over max-abs of the float64 fit's M).

Cases: ``clip32``: clip_like_pairs(5000, 32, noise 0.2), the damped-Newton path (the issue's
regression); ``digits``: ecif.datasets.digits (scikit-learn's scans drawn in colour, 15%
shuffled captions), 1400 pairs embedded by the tiny CLIP (64-d, Newton path; the set's logit
scale);
``shapes``: the shapes demo set (2000 pairs, 64-d, Newton); ``clip128``:
clip_like_pairs(20000, 128), the L-BFGS path. The tiny model is trained once and cached.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

import ecif
from ecif.datasets import clip_like_pairs
from ecif.engine.head import HeadObjective


def _clip(n, d):
    def make():
        x, y, _ = clip_like_pairs(n, d, noise=0.2, seed=0)
        return ecif.EmbeddingSet(x.astype(np.float32), y.astype(np.float32))

    return make


def _digits():
    """ecif.datasets.digits(1400, noise 0.15) as a new user would: parquet shards, then
    ``ecif.embed`` with the tiny CLIP (cached under the ecif cache)."""
    from ecif.data.layout import read_manifest
    from ecif.data.tiny_clip import cache_dir, tiny_clip

    folder = cache_dir() / "datasets" / "bench-convergence-digits-1400-0.15-0"
    emb = folder / "emb"
    man = read_manifest(emb) if emb.exists() else None
    if not (man and man.get("complete")):
        ecif.datasets.digits(1400, seed=0, noise=0.15).to_parquet(folder / "shards")
        ecif.embed(folder / "shards", emb, model=f"local-dir:{tiny_clip()}")
    return ecif.EmbeddingSet.load(emb)


def _shapes():
    return ecif.datasets.shapes_sets(2000, 0.2)[0]


CASES = {
    "clip32": _clip(5000, 32),
    "digits": _digits,
    "shapes": _shapes,
    "clip128": _clip(20000, 128),
}


def grad_max_float64(head, train) -> float:
    """max |grad J| of ``head``'s M, evaluated by the float64 objective."""
    h64 = head.with_theta(head.theta().double())
    h64.m0 = head.m0.double()
    _, g = HeadObjective(h64, train.image, train.text).value_and_grad(h64.theta())
    return float(g.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    a = ap.parse_args()
    print(f"{torch.get_num_threads()} threads, default fit options\n")
    print(
        "| case | dtype | solver | iterations | passes | wall s | grad max | grad max "
        "(float64 eval) | tol | converged | warned | dist. to float64 optimum |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.cases:
        train = CASES[name]()
        ref = None
        for dtype in a.dtypes:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                head = ecif.fit(train, seed=0, dtype=dtype)
            sec = time.perf_counter() - t0
            warned = any("converge" in str(w.message).lower() for w in caught)
            if dtype == "float64":
                ref = head.m
            dist = (
                ""
                if ref is None or dtype == "float64"
                else (f"{float((head.m.double() - ref).abs().max() / ref.abs().max()):.1e}")
            )
            i = head.info
            print(
                f"| {name} | {dtype} | {i['solver']} | {i['iterations']} | {i['evaluations']} "
                f"| {sec:.1f} | {i['grad_max']:.1e} | {grad_max_float64(head, train):.1e} "
                f"| {i['tol']:.0e} | {i['converged']} | {warned} | {dist} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
