"""Cost growth: fit + solve + score time and peak memory at several N (synthetic embeddings).

    python benchmarks/bench_scale.py                      # N = 10k, 100k, 1M at d = 128
    python benchmarks/bench_scale.py --sizes 10000 100000 --d 256

Each size runs in a fresh subprocess so its peak RSS is its own. The fit is full-batch L-BFGS
(a fixed iteration budget, so time per iteration is comparable across N), the solve is CG on
a fixed-size Hessian subsample, the scoring pass streams every pair. Linear time shows as a
constant time per pair; flat memory as a constant peak above the embeddings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(n: int, d: int, iters: int) -> dict:
    import torch

    import ecif
    from ecif.engine.influence import loss_gradient, score_pass

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    x /= x.norm(dim=1, keepdim=True)
    y = torch.randn(n, d, generator=g).mul_(0.8).add_(x)
    y /= y.norm(dim=1, keepdim=True)
    train = ecif.EmbeddingSet(x.numpy(), y.numpy(), check_finite=False)
    emb_mb = 2 * n * d * 4 / 2**20
    t0 = time.perf_counter()
    head = ecif.fit(train, batch_size=256, solver="lbfgs", max_iter=iters, tol=1e-12)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    inv = ecif.solver(
        head, train, method="cg", hessian_batches=min(40, head.partition.num_batches), tol=1e-4
    )
    w = inv.solve(loss_gradient(head, x[:4096].numpy(), y[:4096].numpy()))
    t_solve = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_pass(head, train.image, train.text, w)
    t_score = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n": n,
        "fit_s": t_fit,
        "fit_iters": head.info["iterations"],
        "fit_evals": head.info["evaluations"],
        "solve_s": t_solve,
        "score_s": t_score,
        "peak_above_emb_mb": peak - rss0 - emb_mb,
        "emb_mb": emb_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30, help="L-BFGS iteration budget per fit")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.d, a.iters)))
        return
    rows = []
    for n in a.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--d", str(a.d), "--iters", str(a.iters)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"N={n:>9,}: fit {r['fit_s']:7.1f} s ({r['fit_evals']} evals, "
            f"{r['fit_s'] / r['fit_evals'] / n * 1e6:.2f} us/pair/eval), solve {r['solve_s']:5.1f} s, "
            f"score {r['score_s']:6.1f} s ({r['score_s'] / n * 1e6:.2f} us/pair), "
            f"peak above embeddings {r['peak_above_emb_mb']:.0f} MB (embeddings {r['emb_mb']:.0f} MB)",
            flush=True,
        )


if __name__ == "__main__":
    main()
