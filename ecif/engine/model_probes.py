"""Per-pair norms ||H^-1 grad R_n|| and self-influence grad R_n^T H^-1 grad R_n in the model
modes, from K random probes: K solves (one block CG) and K scoring passes for all pairs at
once, no per-pair gradient or solve (docs/math.md section 12).

For xi ~ N(0, I) and d_n = H^-1 grad R_n, ``xi^T d_n = grad R_n^T (H^-1 xi)`` is the scoring
pass's directional derivative along ``w = H^-1 xi``, and ``E[(xi^T d_n)^2] = ||d_n||^2`` (a
Johnson-Lindenstrauss estimate; relative error about sqrt(1/(2K)) on the norm).

Self-influence uses, for any symmetric invertible M, ``E[(grad R_n^T M xi)(grad R_n^T H^-1
M^-1 xi)] = grad R_n^T H^-1 grad R_n``. With M = P^1/2, P the K-FAC preconditioner (P ~
H^-1), both factors approach ``xi^T H^-1/2 grad R_n`` and the estimate a mean of squares
(relative error about sqrt(2/K)), while staying unbiased when P is rough. On the tests'
problem (145 parameters, K = 64) the median relative error was 0.09-0.19 whitened and
0.13-0.23 with M = I over three probe seeds; norms 0.04-0.08.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ecif.engine.encoder_influence import ModelInverse, score_pass
from ecif.engine.encoder_model import EncoderModel

DEFAULT_PROBES = 32
# CG tolerance of the probes' solves: the estimate's own noise (another probe seed: Spearman
# 0.78 on 2,000 shapes pairs) dwarfs what 1e-2 changes against 1e-4 (Spearman 0.99998), at
# half the seconds (benchmarks/bench_probe_tol.py)
PROBE_SOLVE_TOL = 1e-2
BLOCK_BYTES = 2**27  # one (K, P) array of a block solve, at most


@dataclass
class ProbeEstimate:
    """K probe values per pair: ``along`` = grad R_n^T M xi_k, ``through`` = grad R_n^T H^-1
    M^-1 xi_k (rows = probes, columns = pairs; NaN for removed rows)."""

    along: np.ndarray | None  # None when not computed (norms need only ``through``)
    through: np.ndarray
    identity: bool  # M = I (then ``through`` alone gives the norms)

    def norms(self) -> np.ndarray:
        """||H^-1 grad R_n||: the root mean square of ``xi^T d_n`` (needs M = I)."""
        if not self.identity:
            raise ValueError("norms need probes with M = I: probe_estimate(..., whiten=False)")
        return np.sqrt(np.mean(self.through**2, axis=0))

    def self_influence(self) -> np.ndarray:
        """grad R_n^T H^-1 grad R_n, the mean of the probes' products."""
        if self.along is None:
            raise ValueError(
                "self-influence needs the passes along M xi: probe_estimate(along=True)"
            )
        return np.mean(self.along * self.through, axis=0)


def probe_estimate(
    model: EncoderModel,
    train,
    *,
    probes: int | torch.Tensor = DEFAULT_PROBES,
    whiten: bool = True,
    along: bool = True,
    inverse: ModelInverse | None = None,
    tol: float | None = None,
    neg: str = "exact",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    solve_progress: Callable[[float], None] | None = None,
) -> ProbeEstimate:
    """The probe values for every training row. ``probes``: how many Gaussian directions, or
    the directions themselves (K, P). ``whiten``: M = P^1/2 from the inverse's K-FAC
    preconditioner (for self-influence); False gives M = I (for norms). ``along``: False
    skips the passes along M xi, which only self-influence reads (norms: half the passes).
    The K solves run as one block CG to ``tol`` (None: the inverse's own; ``solve_progress``:
    its largest relative residual per iteration), then a scoring pass per probe and side
    (``progress``: 1 per probe)."""
    inv = inverse or ModelInverse(model, train.image, train.text)
    if isinstance(probes, int):
        if probes < 1:
            raise ValueError(f"probes must be >= 1; got {probes}")
        gen = torch.Generator().manual_seed(seed)
        xi = torch.randn(probes, model.num_params, generator=gen, dtype=torch.float64)
    else:
        xi = torch.as_tensor(probes, dtype=torch.float64)
        if xi.ndim != 2 or xi.shape[1] != model.num_params:
            raise ValueError(f"probes must be (K, {model.num_params}); got {tuple(xi.shape)}")
    xi = xi.to(dtype=model.dtype, device=model.device)
    pre = inv.precond if whiten else None
    if whiten and pre is None:
        raise ValueError("whiten=True needs the inverse's K-FAC preconditioner")
    m_inv = pre.sqrt(xi) if pre is not None else xi  # M^-1 xi, row by row
    step = solve_block(model)
    w = torch.cat(
        [inv.solve(m_inv[i : i + step], solve_progress, tol) for i in range(0, len(xi), step)]
    )
    values = {"along": [], "through": []}
    for k in range(len(xi)):
        if along:
            u = pre.inverse_sqrt(xi[k]) if pre is not None else xi[k]  # M xi
            values["along"].append(sum(score_pass(model, train.image, train.text, u, neg=neg)))
        values["through"].append(sum(score_pass(model, train.image, train.text, w[k], neg=neg)))
        if progress is not None:
            progress(1)
    return ProbeEstimate(
        along=np.stack(values["along"]) if along else None,
        through=np.stack(values["through"]),
        identity=pre is None,
    )


def probe_norms(
    model: EncoderModel,
    train,
    *,
    probes: int | torch.Tensor = DEFAULT_PROBES,
    inverse: ModelInverse | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """||H^-1 grad R_n|| of every row (relative influence's denominator): probes with M = I,
    solved to ``PROBE_SOLVE_TOL``, and only the passes the norms read."""
    est = probe_estimate(
        model,
        train,
        probes=probes,
        whiten=False,
        along=False,
        inverse=inverse,
        tol=PROBE_SOLVE_TOL,
        seed=seed,
        progress=progress,
    )
    return np.asarray(est.norms(), dtype=np.float64)


def solve_block(model: EncoderModel) -> int:
    """How many probes one block CG solves at once: all of them, unless one (K, P) array
    would pass ``BLOCK_BYTES`` (block CG holds about seven)."""
    row = model.num_params * torch.finfo(model.dtype).bits // 8
    return max(1, BLOCK_BYTES // row)
