"""How exactly a model mode's self-influence probes need their solves: time and agreement of
the probe estimate at several CG tolerances, against the noise of the estimate itself.

    python benchmarks/bench_probe_tol.py --data shapes --n 2000
    python benchmarks/bench_probe_tol.py --data digits --n 2000

Per seed: ``--data`` rendered and embedded by the tiny CLIP with the projection feature cache,
20% mixed noise; the projection part fit at the scale an audit without a validation set uses
(the geometric mean of the all-pairs and trimmed calibrations). Then the 32-probe estimate of
self-influence with each ``--tols`` CG tolerance (same probes): seconds, Spearman and largest
difference (as a share of the largest value) against the tightest tolerance, and the AP of
the estimate for the planted noise. The K solves run as one block CG, as an audit runs them;
the row "separate" is the same estimate at the audit's tolerance (``PROBE_SOLVE_TOL``) with one
CG per probe, the way before block CG, for the seconds ratio. The last line is the noise
floor: the same estimate with another probe seed, at the tightest tolerance.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_model_mode import embedded
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score

from ecif.audit.selection import SelectArgs, calibrated_scale, trimmed_scale
from ecif.engine.encoder_influence import ModelInverse
from ecif.engine.model_mode import ModelArgs, fit_model
from ecif.engine.model_probes import PROBE_SOLVE_TOL, probe_estimate


class SeparateSolves(ModelInverse):
    """One CG per right-hand side, as the probes were solved before block CG."""

    def solve(self, g: torch.Tensor, progress=None) -> torch.Tensor:
        if g.dim() == 2:
            return torch.stack([super(SeparateSolves, self).solve(row) for row in g])
        return super().solve(g)


def one_seed(a, seed: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        train, emb, labels = embedded(
            Path(tmp) / "train", a.n, seed, 0.2, kind="projection", blocks=1, data=a.data
        )
        return estimates(a, seed, train, emb, labels)


def estimates(a, seed: int, train, emb, labels) -> list[dict]:
    y = labels.loc[np.asarray(train.ids).astype(str), "is_corrupted"].to_numpy()
    every = calibrated_scale(emb.image, emb.text, 64, seed)
    drop = SelectArgs().untrusted_drop
    trimmed = trimmed_scale(emb.image, emb.text, drop, 64, seed, start=every)
    scale = float(np.sqrt(every * trimmed))
    model = fit_model(train, train.init, ModelArgs(batch_size=64, logit_scale=scale, seed=seed))
    tols = sorted(a.tols)

    def row(tol, est, ref, seconds) -> dict:
        return {
            "seed": seed,
            "scale": scale,
            "tol": tol,
            "seconds": seconds,
            "spearman": spearmanr(est, ref)[0],
            "max diff": np.max(np.abs(est - ref)) / np.max(np.abs(ref)),
            "AP": average_precision_score(y, est),
        }

    def estimate(tol: float, probe_seed: int, solver=ModelInverse) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        inverse = solver(model, train.image, train.text, tol=tol)
        est = probe_estimate(model, train, inverse=inverse, seed=probe_seed).self_influence()
        return est, time.perf_counter() - start

    ref, seconds = estimate(tols[0], seed)
    rows = [row(tols[0], ref, ref, seconds)]
    for tol in tols[1:]:
        est, seconds = estimate(tol, seed)
        rows.append(row(tol, est, ref, seconds))
    est, seconds = estimate(PROBE_SOLVE_TOL, seed, SeparateSolves)
    rows.append(row(f"{PROBE_SOLVE_TOL:g} separate", est, ref, seconds))
    other, _ = estimate(tols[0], seed + 1)
    rows.append(row("other probes", other, ref, np.nan))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", choices=("digits", "shapes"), default="shapes")
    ap.add_argument("--n", type=int, default=2000, help="training pairs")
    ap.add_argument("--seeds", type=int, default=1, help="data seeds (probe seed = data seed)")
    ap.add_argument(
        "--tols",
        type=float,
        nargs="+",
        default=[1e-4, 1e-3, 1e-2, 3e-2],
        help="CG tolerances; the tightest is the reference",
    )
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    df = pd.DataFrame([row for seed in range(a.seeds) for row in one_seed(a, seed)])
    print(df.round(5).to_string(index=False))
    block = df[df["tol"] == PROBE_SOLVE_TOL].set_index("seed")["seconds"]
    apart = df[df["tol"] == f"{PROBE_SOLVE_TOL:g} separate"].set_index("seed")["seconds"]
    ratio = apart / block
    print(
        f"at tol {PROBE_SOLVE_TOL:g}: separate solves / block CG seconds per seed "
        f"{', '.join(f'{r:.2f}' for r in ratio)}; mean {ratio.mean():.2f}x"
    )


if __name__ == "__main__":
    main()
