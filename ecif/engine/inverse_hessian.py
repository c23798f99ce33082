"""Inverse-Hessian solves for the head objective: dense exact, CG, and EK-FAC; the Newton-CG step.

The head's Hessian in M is exactly a sum of Kronecker products,
(t^2/N) [sum_i x_i x_i^T (x) Cov_{p_i}(y) + sum_j Cov_{q_j}(x) (x) y_j y_j^T] + lambda I,
so an eigenbasis Q1 (x) Q2 of its summed factors, with the EXACT diagonal of H in that basis
(one pass over the data), gives an EK-FAC approximation that is cheap to apply and a strong
preconditioner for CG with exact Hessian-vector products.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch

from ecif.engine.ekfac import EKFAC
from ecif.engine.head import DENSE_HESSIAN_MAX_PARAMS, Head, HeadObjective
from ecif.engine.row_sums import RowSource
from ecif.engine.warning_types import UnreliableInfluenceWarning, cg_not_converged
from ecif.grad.newton import Direction, cg_direction
from ecif.grad.solvers import LinearOp, cholesky_with_damping, conjugate_gradient
from ecif.options import option, renamed

SOLVERS = ("auto", "exact", "cg", "ekfac")
METHODS = SOLVERS  # the old name, kept for one release
# what each solver is; a stage adds what its 'auto' picks
SOLVER_HELP = (
    "inverse-Hessian solver: 'exact' (dense Hessian, small heads), 'cg' (exact Hessian-vector "
    "products, EK-FAC preconditioned, to relative residual 1e-4: scores to ~1e-3 of the "
    "largest), 'ekfac' (no iterations: fast but approximate, for screening)"
)

# a batch sample's Hessian as curvature (CG's preconditioner here, the fit's Newton steps in
# ecif/engine/fit.py). Its pairs must outnumber the parameters: at 1.5 pairs a parameter the
# fit spent more passes than without (the sample's optimum was far off, its Newton steps
# cut the gradient <2x each), at 8-32 it saved 40% (d = 8, 16k pairs) and at 16 the fit
# took 5 full passes instead of 92 (d = 64, 300k pairs). Auto: at least 256 batches and 8
# pairs a parameter, only where that is at most a quarter of the batches.
SAMPLE_BATCHES = 256
SAMPLE_PAIRS_PER_PARAM = 8
AUTO_SAMPLE_RATIO = 4
INNER_TOL = 1e-2  # the sample's own solve: its Hessian is only ~that close to the full one
INNER_MAX_ITER = 100
# and at most one full pass's worth of the sample's products (num_batches / k of them): a
# flexible outer CG tolerates an inexact preconditioner, and beyond the cost of the outer
# product it saves, refining it does not pay (1M pairs, scale 100: ~20 inner products an
# application at 1e-2, 13% of a pass each; capped at 8, one outer iteration more)
INNER_PASSES: float | None = 1.0

# CG iterations expected with the EK-FAC preconditioner (5-10 measured at d <= 64)
CG_ITERATIONS_EXPECTED = 12
PASS_OVERHEAD = 1e6  # fixed cost of one streamed pass (Python, chunking), in flop units


@renamed(method="solver")
@dataclass
class SolverArgs:
    """How to apply H^-1 (``ecif.solver``'s keywords, each default here and nowhere else)."""

    solver: str = option(
        "auto",
        help=f"{SOLVER_HELP}, 'auto' (exact when that costs less than cg, else cg)",
        choices=SOLVERS,
    )
    # 1e-4: Spearman 1.0000 against 1e-7 on rotated and CLIP-like sets (d = 128-256), 25-40%
    # fewer iterations than 1e-6
    tol: float = option(1e-4, help="CG's relative residual: scores to ~1e-3 of the largest at 1e-4")
    max_iter: int = option(300, help="CG iterations at most")
    exact_max_params: int = option(
        DENSE_HESSIAN_MAX_PARAMS,
        help="'auto' takes the dense exact factorization only up to this many head parameters "
        "(the dense Hessian's memory ceiling)",
    )
    solves: int = option(1, help="right-hand sides expected; many favour the dense factorization")
    hessian_batches: int | None = option(None, help="subsample this many batches for H (None: all)")
    # at 100k pairs 256 of 400 batches gave scores with Spearman 0.9997 (d = 64) / 0.998
    # (d = 256) against all, and the same CG iterations as a preconditioner: passes saved at
    # scale, not fidelity
    ekfac_batches: int | None = option(
        256, help="EK-FAC factors and diagonal from at most this many batches (None: all)"
    )
    # ~6 KB a pair at d = 512, B = 256
    cache_bytes: int = option(
        1 << 30,
        help="CG keeps batches' embeddings and softmaxes in memory up to this many bytes across "
        "its Hessian-vector products (0: recompute every time)",
    )
    seed: int = option(0, help="seed of the batch subsamples")
    # ecif/engine/inverse_hessian.py sampled_inverse: the same residual tolerance on the full
    # Hessian, with CG's full-data products cut several-fold at 1M pairs
    sample_batches: int | None = option(
        None,
        help="precondition CG's full-data products by a solve on this many batches' Hessian "
        f"(flexible CG; the residual is still the full one's); None: auto (at least "
        f"{SAMPLE_BATCHES} batches and {SAMPLE_PAIRS_PER_PARAM} pairs a parameter, where the "
        f"partition has {AUTO_SAMPLE_RATIO}x as many batches), 0: EK-FAC alone",
    )


SOLVER_FIELDS = tuple(f.name for f in fields(SolverArgs))


def _subsample(nb: int, k: int | None, seed: int) -> np.ndarray | None:
    """k of nb batch ids, sorted (None: all of them)."""
    if k is None or k >= nb:
        return None
    return np.sort(np.random.default_rng(seed).choice(nb, size=k, replace=False))


def auto_method(head: Head, args: SolverArgs) -> str:
    """``exact`` or ``cg``, whichever is estimated to cost less.

    Assembling the dense Hessian costs ~P^2 per pair (Kronecker blocks, large GEMMs) plus the
    P^3/3 Cholesky; one Hessian-vector product ~P + 5 B (d_img + d_txt) per pair (the B x B
    logit work dominates at small d) plus a fixed cost per pass. Calibrated on 20k pairs,
    B = 256: the dense build costs 2, 9, 29, 97 products at d = 16, 32, 48, 64, while CG needs
    5-10 of them per right-hand side.
    """
    p = head.num_params
    if p > args.exact_max_params:
        return "cg"
    di, dt = head.m.shape
    n, nb = head.partition.n, head.partition.num_batches
    if args.hessian_batches is not None:
        n = n * min(args.hessian_batches, nb) / max(nb, 1)
    dense = n * p * p + p**3 / 3
    hvp = n * (p + 5 * head.partition.width * (di + dt)) + PASS_OVERHEAD
    return "exact" if dense <= CG_ITERATIONS_EXPECTED * max(args.solves, 1) * hvp else "cg"


def not_positive_definite(dense: torch.Tensor, damping: float, lam: float) -> str:
    """What a user is told when the exact Hessian factored only with damping added: it is
    positive definite in exact arithmetic (a convex loss plus lam I), so its dtype failed."""
    dtype = str(dense.dtype).removeprefix("torch.")
    return (
        f"the head's exact Hessian is not positive definite in {dtype}, though it is in exact "
        f"arithmetic (a convex loss plus lam {lam:g}): influence was solved with H + "
        f"{damping:.2g} I and is unreliable. Large logits (unnormalised embeddings, or a very "
        f"sharp logit scale) cancel in {dtype}'s sums: L2-normalise the rows, or audit with "
        "dtype float64"
    )


class InverseHessian:
    """H^-1 of the fitted head's objective, applied to flat vectors of shape (P,) or (K, P)."""

    def __init__(
        self, head: Head, x, y, args: SolverArgs | None = None, *, rows: RowSource | None = None
    ):
        args = args or SolverArgs()
        if args.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {args.solver!r}")
        self.head, self.args = head, args
        method = args.solver
        if method == "auto":
            method = auto_method(head, args)
        self.method = method
        nb = head.partition.num_batches
        batch_ids = _subsample(nb, args.hessian_batches, args.seed)
        weight = 1.0 if batch_ids is None else nb / len(batch_ids)
        cache = args.cache_bytes if method == "cg" else 0
        self.objective = HeadObjective(
            head, x, y, batch_ids=batch_ids, weight=weight, cache_bytes=cache, rows=rows
        )
        self.theta = head.theta()
        self.info: dict = {"method": method, "hessian_batches": args.hessian_batches or nb}
        self._chol = None
        self._ekfac = None
        self._sample: HeadObjective | None = None
        if method == "exact":
            dense = self.dense()
            self._chol, damping = cholesky_with_damping(dense)
            self.info["damping"] = damping
            if damping > 0:  # convex + lam I: PD in exact arithmetic, not in this dtype
                note = not_positive_definite(dense, damping, head.lam)
                warnings.warn(note, UnreliableInfluenceWarning, stacklevel=2)
        else:  # EK-FAC (the approximation, or CG's preconditioner) from a batch sample
            pool = np.arange(nb) if batch_ids is None else batch_ids
            pick = _subsample(len(pool), args.ekfac_batches, args.seed + 1)
            ek_obj = self.objective
            if pick is not None:
                ek_obj = self.objective.with_head(
                    head, batch_ids=pool[pick], weight=nb / len(pick), cache_bytes=0
                )
            self.info["ekfac_batches"] = len(pool) if pick is None else len(pick)
            self._ekfac = EKFAC.build(ek_obj)
            k = sample_size(args.sample_batches, head) if method == "cg" else 0
            if k and batch_ids is None:
                self._sample = sample_objective(self.objective, k, args.seed + 1, cache)
                self.info["sample_batches"] = k

    @property
    def ekfac(self) -> EKFAC | None:
        """The EK-FAC factors (the approximation, or CG's preconditioner); None when exact."""
        return self._ekfac

    def ekfac_state(self) -> dict:
        """EK-FAC's factors (to save beside an index so queries skip the two passes)."""
        if self._ekfac is None:
            raise ValueError("this solver has no EK-FAC factors (solver exact)")
        ek = self._ekfac
        return {
            "q1": ek.q1,
            "q2": ek.q2,
            "diag": ek.diag,
            "tau_col": ek.tau_col,
            "tau_u": ek.tau_u,
            "schur": ek.schur,
            "args": vars(self.args),
        }

    @classmethod
    def from_ekfac_state(
        cls, head: Head, x, y, state: dict, *, rows: RowSource | None = None
    ) -> InverseHessian:
        """A ``solver="ekfac"`` solver from saved factors, without rebuilding them (``state``
        from ``ekfac_state``; older files name the solver ``method``)."""
        saved = {k: v for k, v in state["args"].items() if k in SOLVER_FIELDS}
        args = SolverArgs(**{**saved, "solver": "ekfac"})
        out = cls.__new__(cls)
        out.head, out.args, out.method = head, args, "ekfac"
        out.objective = HeadObjective(head, x, y, rows=rows)
        out.theta = head.theta()
        out.info = {"method": "ekfac", "hessian_batches": args.hessian_batches, "loaded": True}
        out._chol = None
        out._sample = None
        dev = dict(dtype=head.dtype, device=head.m.device)
        keys = ("q1", "q2", "diag", "tau_col", "tau_u")
        parts = {k: None if state[k] is None else state[k].to(**dev) for k in keys}
        out._ekfac = EKFAC(**parts, schur=state["schur"])
        return out

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        return self.objective.hvp(self.theta, v)

    def dense(self) -> torch.Tensor:
        """The dense Hessian (P x P), exact."""
        return self.objective.dense_hessian(self.theta)

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        single = g.dim() == 1
        gg = g.unsqueeze(0) if single else g
        if self.method == "exact":
            out = torch.cholesky_solve(gg.T, self._chol).T
        elif self.method == "ekfac":
            out = self._ekfac.apply(gg)
        else:
            count, start = self.objective.rows.count, self.objective.rows.count.computed
            precond, flexible = self._ekfac.apply, False
            if self._sample is not None:
                precond, flexible = sampled_inverse(self._sample, self.theta, self._ekfac), True
            res = conjugate_gradient(
                self.hvp,
                gg,
                precond=precond,
                tol=self.args.tol,
                max_iter=self.args.max_iter,
                batch_dims=1,
                flexible=flexible,
            )
            nb = self.head.partition.num_batches
            self.info["passes"] = (count.computed - start) / nb
            self.info.update(cg_iterations=res.iterations, cg_converged=res.converged)
            self.info["cg_rel_residual"] = float(res.rel_residual.max())
            if not res.converged:
                note = cg_not_converged(
                    self.info["cg_rel_residual"], res.iterations, self.args.tol, "H^-1 g"
                )
                warnings.warn(note, UnreliableInfluenceWarning, stacklevel=2)
            out = res.x
        return out[0] if single else out

    def quad_form(self, g: torch.Tensor) -> torch.Tensor:
        """g^T H^-1 g for each row of g (K, P); EK-FAC uses its closed form, no solve."""
        if self.method == "ekfac":
            return self._ekfac.quad_form(g)
        return (g * self.solve(g)).sum(-1)


def newton_cg_direction(
    obj: HeadObjective, rel_tol: float = 1e-2, max_iter: int = 100
) -> Direction:
    """The head's Newton step H^-1 g by CG on exact Hessian-vector products (one pass each),
    preconditioned by EK-FAC rebuilt at each point (two passes). Solving to 1e-2 cuts the
    gradient ~100x a step (measured: 7e-3 -> 1.8e-9 in 4 steps of ~30 products, 10k x 128
    CLIP-like pairs)."""
    # CG's products at one point reuse the chunks' softmaxes, as the scoring solver's do
    cached = obj.with_head(obj.head, cache_bytes=SolverArgs().cache_bytes)

    def precond(theta: torch.Tensor) -> tuple[LinearOp, int]:
        ekfac = EKFAC.build(obj.with_head(obj.head.with_theta(theta), cache_bytes=0))
        return ekfac.preconditioner(), 2

    return cg_direction(cached, precond=precond, rel_tol=rel_tol, max_iter=max_iter)


def sample_size(requested: int | None, head: Head) -> int:
    """Batches of the curvature sample: as asked (0, or all of them: none), else auto (see
    ``SAMPLE_PAIRS_PER_PARAM``)."""
    nb = head.partition.num_batches
    if requested is None:
        k = max(
            SAMPLE_BATCHES, -(-SAMPLE_PAIRS_PER_PARAM * head.num_params // head.partition.width)
        )
        return k if nb >= AUTO_SAMPLE_RATIO * k else 0
    return 0 if requested >= nb else int(requested)


def sample_objective(obj: HeadObjective, k: int, seed: int, cache_bytes: int) -> HeadObjective:
    """The objective over a seeded sample of ``k`` of ``obj``'s batches, its data term
    reweighted to the full sum (its chunks cached for repeated products at one theta)."""
    nb = obj.head.partition.num_batches
    ids = np.sort(np.random.default_rng(seed).choice(nb, size=k, replace=False))
    return obj.with_head(obj.head, batch_ids=ids, weight=nb / k, cache_bytes=cache_bytes)


def sampled_inverse(
    sample: HeadObjective, theta: torch.Tensor, ekfac: EKFAC | None = None
) -> LinearOp:
    """v -> H_sample(theta)^-1 v on rows (K, P) or a vector: CG on the sample's products to
    ``INNER_TOL``, preconditioned by EK-FAC (built on the sample at theta unless given).
    Not a fixed linear map (CG stops early): an outer CG using it must be flexible."""
    if ekfac is None:
        ekfac = EKFAC.build(sample.with_head(sample.head.with_theta(theta), cache_bytes=0))
    pre = ekfac.preconditioner()

    budget = inner_budget(sample)

    def one(v: torch.Tensor) -> torch.Tensor:
        hvp = lambda u: sample.hvp(theta, u)  # noqa: E731
        return conjugate_gradient(hvp, v, precond=pre, tol=INNER_TOL, max_iter=budget).x

    def apply(v: torch.Tensor) -> torch.Tensor:
        return one(v) if v.dim() == 1 else torch.stack([one(r) for r in v])

    return apply


def inner_budget(sample: HeadObjective) -> int:
    """CG iterations of one inner solve on the sample: ``INNER_MAX_ITER``, or fewer where
    ``INNER_PASSES`` caps their cost (a product on k of nb batches is k/nb of a pass)."""
    if INNER_PASSES is None or sample.batch_ids is None:
        return INNER_MAX_ITER
    nb, k = sample.head.partition.num_batches, len(sample.batch_ids)
    return max(1, min(INNER_MAX_ITER, math.ceil(INNER_PASSES * nb / k)))
