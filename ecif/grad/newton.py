"""Newton's method on any objective, with a step test that still works in float32.

The loop takes the objective (``value_and_grad``, ``ecif.grad.objective.Objective``) and a
``Direction``: how to get the Newton step H^-1 g at a point. Two generic ones are here: the
dense Hessian's (damped) Cholesky factor, and conjugate gradients on exact Hessian-vector
products with an optional preconditioner rebuilt at each point. The head fit
(``ecif.engine.fit``) uses the dense one for small heads and CG preconditioned by EK-FAC
(``ecif.engine.inverse_hessian.newton_cg_direction``) after L-BFGS on large ones.

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

from ecif.grad.objective import DenseObjective, Objective
from ecif.grad.solvers import LinearOp, conjugate_gradient, damped_cholesky

# relative rounding (in units of eps) below which the objective's value no longer judges a
# step: float32 sums of per-pair losses are quantised at ~1 eps |J| (measured)
VALUE_ROUNDING = 10.0
GRADIENT_STEPS = (1.0, 0.5, 0.25)  # step lengths tried on the gradient test
MAX_NEWTON_ITER = 100

# (theta, grad) -> (step ~ H^-1 grad, full passes spent on it)
Direction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]


def newton(
    obj: Objective,
    theta: torch.Tensor,
    direction: Direction,
    tol: float,
    max_iter: int,
    start: tuple[float, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float, torch.Tensor, int, int, str]:
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


def dense_direction(obj: DenseObjective) -> Direction:
    """H^-1 g from ``obj.dense_hessian(theta)`` (damped if indefinite); the build is not
    counted as a pass (the solver's passes count objective evaluations)."""

    def solve(theta: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        factor = damped_cholesky(obj.dense_hessian(theta))
        return torch.cholesky_solve(grad[:, None], factor)[:, 0], 0

    return solve


def cg_direction(
    obj: Objective,
    *,
    precond: Callable[[torch.Tensor], tuple[LinearOp, int]] | None = None,
    rel_tol: float = 1e-2,
    max_iter: int = 100,
) -> Direction:
    """H^-1 g by CG on ``obj.hvp`` (one pass a product) to relative residual ``rel_tol``;
    ``precond(theta)`` gives the preconditioner at theta and the passes its build spent."""

    def solve(theta: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        pre, spent = precond(theta) if precond is not None else (None, 0)
        res = conjugate_gradient(
            lambda v: obj.hvp(theta, v), grad, precond=pre, tol=rel_tol, max_iter=max_iter
        )
        return res.x, spent + res.iterations

    return solve
