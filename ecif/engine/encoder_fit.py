"""Fitting a trainable part of the encoders to a stationary point of the regularised loss.

Influence assumes grad J = 0 (docs/math.md section 4), so, as for the head, the fit runs to
a tolerance on the gradient's largest entry: L-BFGS (strong Wolfe) from the pretrained values
while it makes progress, then Newton steps whose direction is truncated CG on the Gauss-Newton matrix
on the exact Hessian (quadratic convergence near a minimum), or, where that gives no descent
direction (the objective is not convex), on the Gauss-Newton matrix plus the pull, which is
positive definite. ``exclude=`` with ``init=`` is the retraining check:
the same partition less the removed pairs, warm-started at the fitted values.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch

from ecif.engine.encoder_model import EncoderModel, EncoderObjective
from ecif.engine.encoder_precondition import KroneckerPreconditioner
from ecif.engine.fit import ConvergenceWarning
from ecif.engine.warning_types import NOT_CONVERGED
from ecif.grad.newton import Direction, newton
from ecif.grad.solvers import conjugate_gradient

# L-BFGS hands over to Gauss-Newton-CG when its best gradient fell less than this factor in
# this many passes (the same rule as the head's fit)
HANDOVER_PASSES = 30
HANDOVER_FACTOR = 10.0
CG_MAX_ITER = 200


def truncated_newton_direction(
    exact: EncoderObjective, gn: EncoderObjective, precond=None
) -> Direction:
    """H^-1 g by CG on the exact Hessian, stopped at the first direction of non-positive
    curvature (Nocedal and Wright, algorithm 7.1: every iterate is a descent direction);
    if that happens at once, CG on the Gauss-Newton matrix plus the pull (positive definite)
    gives the step instead. Relative residual min(0.5, sqrt(||g||)), so steps turn into
    full Newton steps, and converge quadratically, near a minimum."""

    def solve(theta: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, int]:
        gnorm = float(g.norm())
        target = min(0.5, gnorm**0.5) * gnorm
        pre = precond if precond is not None else (lambda v: v)
        z, r = torch.zeros_like(g), g.clone()
        y = pre(r)
        d, rr = y.clone(), float(r @ y)
        for j in range(CG_MAX_ITER):
            hd = exact.hvp(theta, d)
            curv = float(d @ hd)
            if curv <= 1e-12 * float(d @ d):
                if j > 0:
                    return z, j + 1
                res = conjugate_gradient(
                    lambda v: gn.hvp(theta, v), g, precond=precond, tol=1e-2, max_iter=CG_MAX_ITER
                )
                return res.x, j + 1 + res.iterations
            alpha = rr / curv
            z = z + alpha * d
            r = r - alpha * hd
            if float(r.norm()) <= target:
                return z, j + 1
            y = pre(r)
            rr_new = float(r @ y)
            d = y + (rr_new / rr) * d
            rr = rr_new
        return z, CG_MAX_ITER

    return solve


class _Stop(Exception):
    pass


def default_tol(dtype: torch.dtype) -> float:
    """Gradient max-abs tolerance: 1e-5 in float32, 1e-9 in float64 (as the head's fit)."""
    return 1e-9 if dtype == torch.float64 else 1e-5


def _lbfgs(obj: EncoderObjective, start: torch.Tensor, tol: float, max_iter: int, bar, lin):
    """L-BFGS on phi with theta = start + L phi (L symmetric: the preconditioner's inverse
    square root) until the tolerance on theta's gradient or slow progress; returns (theta,
    value, grad, passes)."""
    best: list = []
    history: list[float] = []

    def evaluate(theta):
        value, grad = obj.value_and_grad(theta)
        if not best or value < best[1]:
            best[:] = [theta.clone(), value, grad]
        gmax = float(grad.abs().max())
        history.append(min(gmax, history[-1]) if history else gmax)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(grad_max=f"{gmax:.2e}", refresh=False)
        return value, grad, gmax

    phi = torch.nn.Parameter(torch.zeros_like(start))
    opt = torch.optim.LBFGS(
        [phi],
        lr=1.0,
        max_iter=max_iter,
        max_eval=int(max_iter * 1.5),
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        value, grad, gmax = evaluate(start + lin(phi.detach()))
        k = HANDOVER_PASSES
        if gmax <= tol or (len(history) > k and history[-1 - k] < HANDOVER_FACTOR * history[-1]):
            raise _Stop
        phi.grad = lin(grad)
        return torch.tensor(value, dtype=phi.dtype)

    try:
        opt.step(closure)
    except _Stop:
        pass
    theta, value, grad = best
    return theta, value, grad, len(history)


def fit_encoder(
    model: EncoderModel,
    image,
    text,
    *,
    init: EncoderModel | None = None,
    exclude_positions: np.ndarray | None = None,
    max_iter: int = 500,
    tol: float | None = None,
    progress: bool = False,
) -> EncoderModel:
    """Fit ``model`` (its partition, pull and curvature) on cached features to ``tol``.

    ``init``: warm start at its theta, with its partition and theta_0. ``exclude_positions``:
    row positions removed from their batches (N in 1/N stays the full set's).
    """
    from tqdm.auto import tqdm

    if init is not None:
        if init.partition.n != len(image):
            raise ValueError(f"init was fit on {init.partition.n} pairs, got {len(image)}")
        model = replace(model, partition=init.partition, theta0=init.theta0, theta=init.theta)
    if exclude_positions is not None and len(exclude_positions):
        model = replace(model, partition=model.partition.without(exclude_positions))
    tol = tol if tol is not None else default_tol(model.dtype)
    gn = EncoderObjective(model, image, text, curvature="gauss_newton")
    bar = tqdm(desc="fit (model)", unit="pass", disable=not progress)
    precond = KroneckerPreconditioner(gn, model.theta)
    theta, value, grad, passes = _lbfgs(
        gn, model.theta.clone(), tol, max_iter, bar, precond.inverse_sqrt
    )
    iterations, stop = 0, "tol"
    if float(grad.abs().max()) > tol:
        exact = EncoderObjective(model, image, text, curvature="exact")
        direction = truncated_newton_direction(exact, gn, KroneckerPreconditioner(gn, theta))
        theta, value, grad, iterations, spent, stop = newton(
            exact, theta, direction, tol, max_iter, start=(value, grad)
        )
        passes += spent
    bar.close()
    gmax = float(grad.abs().max())
    info = {
        "objective": value,
        "grad_max": gmax,
        "grad_norm": float(grad.norm()),
        "optimizer": "lbfgs+newton_cg",
        "newton_iterations": iterations,
        "evaluations": passes,
        "converged": gmax <= tol,
        "stop": "tol" if gmax <= tol else stop,
        "tol": tol,
    }
    if not info["converged"]:
        warnings.warn(
            f"the {model.part.kind} fit {NOT_CONVERGED}: gradient max-abs {gmax:.2e} > tol {tol:.0e} "
            f"({info['stop']}); influence assumes a stationary point: raise max_iter, use "
            "float64, or a larger lam",
            ConvergenceWarning,
            stacklevel=2,
        )
    return model.with_theta(theta.detach(), info=info)
