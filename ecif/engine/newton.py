"""Newton's method on the head objective, with a step test that still works in float32.

Two ways to get the Newton step H^-1 g: the dense Hessian's Cholesky factor (small heads) or
conjugate gradients on exact Hessian-vector products preconditioned by EK-FAC (large heads,
after L-BFGS; ecif/engine/inverse_hessian.py). Both share the loop in ``newton``.

Why the step test matters (issue 13): in float32 the objective's VALUE is quantised at about
eps |J| (a sum of N per-pair losses; J ~ 4 moves in steps of ~4e-7 at 5,000 pairs), while
near the optimum a Newton step lowers J by only half the Newton decrement g^T H^-1 g, ~1e-6
when the gradient's max-abs is still ~1e-3. Armijo on the value then rejects the very step
that would meet the tolerance, and the old "precision floor" stop (decrement below the
value's rounding) ended the fit there, gradient 100x above tol. Below that rounding the
value cannot judge a step, but the gradient can: a full Newton step lowers ||g||
quadratically near the optimum. So a step is accepted on the value while the predicted
decrease is resolvable, else on the gradient's norm; the fit stops short of ``tol`` only
when neither accepts any step, i.e. a Newton step lowers neither J nor ||g||: both are
rounding noise, the point is stationary to the arithmetic's precision ("precision").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ecif.engine.head import HeadObjective
from ecif.engine.inverse_hessian import _EKFAC, SolverArgs
from ecif.grad.solvers import conjugate_gradient

# relative rounding (in units of eps) below which the objective's value no longer judges a
# step: float32 sums of per-pair losses are quantised at ~1 eps |J| (measured)
VALUE_ROUNDING = 10.0
GRADIENT_STEPS = (1.0, 0.5, 0.25)  # step lengths tried on the gradient test
MAX_NEWTON_ITER = 100

# (theta, grad) -> (step ~ H^-1 grad, full passes spent on it)
Direction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]


def newton(
    obj: HeadObjective,
    theta: torch.Tensor,
    direction: Direction,
    tol: float,
    max_iter: int,
    start: tuple[float, torch.Tensor] | None = None,
):
    """Newton steps from ``theta`` until max |g| <= ``tol``. Returns (theta, value, grad,
    iterations, passes, stop) with stop "tol", "precision", "max_iter" (see module doc) or
    "direction" (the solve gave no descent direction; the caller falls back)."""
    value, grad = start if start is not None else obj.value_and_grad(theta)
    passes = 0 if start is not None else 1
    eps = float(torch.finfo(theta.dtype).eps)
    iterations, stop = 0, "tol"
    while float(grad.abs().max()) > tol:
        if iterations >= min(max_iter, MAX_NEWTON_ITER):
            stop = "max_iter"
            break
        step, spent = direction(theta, grad)
        passes += spent
        decrement = float(grad @ step)  # > 0 for a descent step
        iterations += 1
        found = None
        if not (math.isfinite(decrement) and decrement > 0):
            stop = "direction"  # not a descent direction (an indefinite Hessian): no step
            break
        if 0.5 * decrement > VALUE_ROUNDING * eps * max(1.0, abs(value)):
            a = 1.0
            for _ in range(30):  # Armijo backtracking on the value
                v_new, g_new = obj.value_and_grad(theta - a * step)
                passes += 1
                if v_new <= value - 1e-4 * a * decrement:
                    found = (theta - a * step, v_new, g_new)
                    break
                a *= 0.5
        if found is None:  # the value cannot resolve the decrease: the gradient can
            norm = float(grad.norm())
            for a in GRADIENT_STEPS:
                v_new, g_new = obj.value_and_grad(theta - a * step)
                passes += 1
                if float(g_new.norm()) < norm:
                    found = (theta - a * step, v_new, g_new)
                    break
        if found is None:
            stop = "precision"
            break
        theta, value, grad = found
    return theta, value, grad, iterations, passes, stop


def dense_direction(obj: HeadObjective) -> Direction:
    """H^-1 g from the dense Hessian (damped if indefinite); the build is not counted as a
    pass (the solver's passes count objective evaluations, as before)."""

    def solve(theta: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        factor = damped_cholesky(obj.dense_hessian(theta))
        return torch.cholesky_solve(grad[:, None], factor)[:, 0], 0

    return solve


def cg_direction(obj: HeadObjective, rel_tol: float = 1e-2, max_iter: int = 100) -> Direction:
    """H^-1 g by CG on exact Hessian-vector products (one pass each), preconditioned by
    EK-FAC rebuilt at each point (two passes). Solving to 1e-2 cuts the gradient ~100x a
    step (measured: 7e-3 -> 1.8e-9 in 4 steps of ~30 products, 10k x 128 CLIP-like pairs)."""
    # CG's products at one point reuse the chunks' softmaxes, as the scoring solver's do
    cached = HeadObjective(obj.head, obj.x, obj.y, cache_bytes=SolverArgs().cache_bytes)

    def solve(theta: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        ekfac = _EKFAC.build(HeadObjective(obj.head.with_theta(theta), obj.x, obj.y))
        res = conjugate_gradient(
            lambda v: cached.hvp(theta, v),
            grad,
            precond=_positive(ekfac),
            tol=rel_tol,
            max_iter=max_iter,
        )
        return res.x, 2 + res.iterations

    return solve


def _positive(ekfac: _EKFAC) -> Callable[[torch.Tensor], torch.Tensor]:
    """EK-FAC as a CG preconditioner, which must be positive definite. With a learned scale
    its Schur complement can be negative away from the optimum (the M block's approximation
    is rough against the exact coupling column; measured -3.5 at grad 2.5e-2): then the M
    block and the exact H_tau,tau on the diagonal instead."""
    if ekfac.schur is None or ekfac.schur > 0:
        return lambda r: ekfac.apply(r[None])[0]
    h_tt = ekfac.schur + float(ekfac.tau_col @ ekfac.tau_u)
    if not h_tt > 0:
        return lambda r: torch.cat([ekfac._apply_m(r[None, :-1])[0], r[-1:]])
    return lambda r: torch.cat([ekfac._apply_m(r[None, :-1])[0], r[-1:] / h_tt])


def damped_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of H, or of H + mu I when H is indefinite (learned scale, far from the
    optimum: the objective is convex in M but not jointly in (M, log t))."""
    mu = 0.0
    scale = float(h.diagonal().abs().max())
    for _ in range(30):
        factor, info = torch.linalg.cholesky_ex(
            h + mu * torch.eye(len(h), dtype=h.dtype, device=h.device)
        )
        if int(info) == 0:
            return factor
        mu = max(mu * 10.0, 1e-6 * scale)
    raise RuntimeError("Hessian could not be made positive definite")
