"""Fitting the head: damped Newton for small heads, L-BFGS for large ones, to a tolerance.

The objective is strongly convex in M, so both reach the unique optimum; a Newton-CG polish
gives the float64 precision that leave-one-out checks need. On large sets a streamed
minibatch warm-up (ecif/engine/warmup.py) gives the full-batch solver a better start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ecif.engine.batches import make_partition
from ecif.engine.head import DTYPES, Head, HeadObjective
from ecif.engine.precondition import moment_whitener
from ecif.engine.warmup import auto_epochs, check_warmup_args, minibatch_warmup
from ecif.grad.solvers import conjugate_gradient


@dataclass
class FitArgs:
    """How to fit the head. Defaults suit unit-norm CLIP embeddings."""

    batch_size: int = 256
    seed: int = 0
    lam: float = 1e-3
    logit_scale: float = 100.0
    learn_scale: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    max_iter: int = 500
    tol: float | None = None  # gradient max-abs tolerance; default by dtype
    history_size: int = 20
    # L-BFGS in variables whitened by the embeddings' second moments (ecif/engine/precondition.py):
    # the same optimum in far fewer passes on anisotropic (CLIP-like) embeddings
    whiten: bool = True
    newton_steps: int = 0  # exact Newton-CG polish after L-BFGS (for tight retraining checks)
    solver: str = "auto"  # "newton" (dense Hessian, damped), "lbfgs"; auto: newton if P <= 4096
    # streamed minibatch epochs (RMS-normalised momentum) before the full-batch solver; None:
    # auto (2 on the L-BFGS path from 50k pairs, without init), 0: off. Same optimum, fewer
    # full passes (ecif/engine/warmup.py).
    warmup_epochs: int | None = None
    warmup_lr: float | None = None  # peak RMS step per entry of M; None: by width and steps
    warmup_batches: int = 1  # partition batches per warm-up step
    progress: bool = False  # progress bars for the warm-up and the L-BFGS evaluations


def new_head(
    x, y, args: FitArgs, m0: torch.Tensor | None = None, groups: np.ndarray | None = None
) -> Head:
    """The starting point theta_0: identity adapter (rectangular identity if widths differ)."""
    dtype = DTYPES[args.dtype]
    di, dt = int(x.shape[1]), int(y.shape[1])
    if m0 is None:
        m0 = torch.eye(di, dt, dtype=dtype, device=args.device)
    if args.logit_scale <= 0:
        raise ValueError("logit_scale must be positive")
    tau0 = math.log(args.logit_scale)
    part = make_partition(len(x), args.batch_size, args.seed, groups=groups)
    return Head(
        m=m0.clone(),
        m0=m0.clone(),
        log_scale=tau0,
        log_scale0=tau0,
        learn_scale=args.learn_scale,
        lam=args.lam,
        partition=part,
        n_norm=len(x),
    )


def fit_head(head: Head, x, y, args: FitArgs, init: Head | None = None) -> Head:
    """Fit to a gradient tolerance: damped Newton (dense Hessian) for small heads, full-batch
    L-BFGS (strong Wolfe) for large ones; warm start from ``init``."""
    if head.lam <= 0:
        raise ValueError("lam must be > 0: the L2 pull makes the Hessian invertible")
    obj = HeadObjective(head, x, y)
    start = (
        head.theta() if init is None else init.theta().to(dtype=head.dtype, device=head.m.device)
    )
    if start.numel() != head.num_params:
        raise ValueError("init head has a different shape or learn_scale setting")
    tol = args.tol if args.tol is not None else (1e-9 if head.dtype == torch.float64 else 1e-5)
    solver = args.solver
    if solver == "auto":
        solver = "newton" if head.num_params <= 4096 else "lbfgs"
    if solver not in ("newton", "lbfgs"):
        raise ValueError(f"solver must be auto, newton or lbfgs; got {args.solver!r}")
    check_warmup_args(args.warmup_epochs, args.warmup_lr, args.warmup_batches)
    members = int((head.partition.index >= 0).sum())
    epochs = auto_epochs(args.warmup_epochs, solver, members, warm_start=init is not None)
    warmup = None
    if epochs > 0:
        start, warmup = minibatch_warmup(
            head,
            x,
            y,
            start,
            epochs=epochs,
            lr=args.warmup_lr,
            batches_per_step=args.warmup_batches,
            progress=args.progress,
        )
    run = _newton if solver == "newton" else _lbfgs
    theta, value, grad, iterations, evaluations = run(obj, start, args, tol)
    gmax = float(grad.abs().max())
    for _ in range(args.newton_steps):
        if gmax <= tol * 1e-3:
            break
        at = theta.detach()
        step = conjugate_gradient(
            lambda v, at=at: obj.hvp(at, v), grad, tol=1e-9, max_iter=2 * head.num_params + 10
        ).x
        theta = theta - step
        value, grad = obj.value_and_grad(theta.detach())
        gmax = float(grad.abs().max())
    info = {
        "objective": value,
        "grad_max": gmax,
        "grad_norm": float(grad.norm()),
        "solver": solver,
        "iterations": iterations,
        "evaluations": evaluations,  # full-batch passes of the solver (the warm-up's aside)
        "converged": gmax <= tol * 10,
        "tol": tol,
        "warmup": warmup,  # None, or the warm-up's epochs, steps, seconds (warmup.py)
    }
    return head.with_theta(theta.detach(), info=info)


class _Converged(Exception):
    """Raised from the L-BFGS closure once the true gradient meets the tolerance."""


def _lbfgs(obj: HeadObjective, start: torch.Tensor, args: FitArgs, tol: float):
    """torch's L-BFGS on phi with theta = base + L phi (L symmetric: the whitening, or the
    identity); stops on the gradient in theta, the quantity ``tol`` is about."""
    from tqdm.auto import tqdm

    lin = moment_whitener(obj.head, obj.x, obj.y) if args.whiten else (lambda v: v)
    bar = tqdm(desc="fit (L-BFGS)", unit="pass", disable=not args.progress)
    last: list = []  # (theta, value, grad) of the latest full pass
    passes = [0]

    def evaluate(at: torch.Tensor):
        if last and torch.equal(last[0], at):
            return last[1], last[2]  # torch's L-BFGS often ends on its latest evaluated point
        value, grad = obj.value_and_grad(at)
        last[:] = [at.clone(), value, grad]
        passes[0] += 1
        bar.update(1)
        bar.set_postfix(grad_max=f"{float(grad.abs().max()):.2e}", refresh=False)
        return value, grad

    base, iterations = start.clone(), 0
    for _restart in range(5):  # L-BFGS can stop on a zero step before the tolerance; restart
        phi = torch.nn.Parameter(torch.zeros_like(start))
        opt = torch.optim.LBFGS(
            [phi],
            lr=1.0,
            max_iter=max(args.max_iter - iterations, 1),
            max_eval=int(max(args.max_iter - iterations, 1) * 1.5),
            tolerance_grad=0.0,  # the closure checks the gradient in theta
            tolerance_change=0.0,
            history_size=args.history_size,
            line_search_fn="strong_wolfe",
        )

        def closure(phi=phi, base=base, lin=lin):
            value, grad = evaluate(base + lin(phi.detach()))
            if float(grad.abs().max()) <= tol:
                raise _Converged
            phi.grad = lin(grad)
            return torch.tensor(value, dtype=phi.dtype)

        met = False
        try:
            opt.step(closure)
        except _Converged:
            met = True  # ``last`` is the point that met it (a line-search trial, maybe)
        done = int(opt.state[opt._params[0]].get("n_iter", 0))
        iterations += done
        if met:
            break
        base = base + lin(phi.detach())
        _, grad = evaluate(base)
        if float(grad.abs().max()) <= tol or iterations >= args.max_iter:
            break
        if done <= 1:  # a zero step at once: the line search is at the loss's precision
            break
    theta, value, grad = last
    if float(grad.abs().max()) > 10 * tol and iterations < args.max_iter:  # not converged
        theta, value, grad = _newton_polish(obj, theta, value, grad, tol, passes)
    bar.close()
    return theta, value, grad, iterations, passes[0]


def _newton_polish(obj: HeadObjective, theta, value, grad, tol: float, passes: list, steps=3):
    """Newton-CG steps (exact Hessian-vector products, no line search; each solve to 1e-3, so
    the gradient shrinks ~1000x a step) for when L-BFGS stalls short of the tolerance because
    the remaining decrease is below the loss's rounding. A step is kept only if it lowers the
    gradient's max-abs, the quantity the tolerance is about; each product counts as a pass."""
    for _ in range(steps):
        res = conjugate_gradient(lambda v, at=theta: obj.hvp(at, v), grad, tol=1e-3, max_iter=50)
        passes[0] += res.iterations + 1
        cand = theta - res.x
        v_new, g_new = obj.value_and_grad(cand)
        if float(g_new.abs().max()) >= float(grad.abs().max()):
            break
        theta, value, grad = cand, v_new, g_new
        if float(grad.abs().max()) <= tol:
            break
    return theta, value, grad


def _newton(obj: HeadObjective, start: torch.Tensor, args: FitArgs, tol: float):
    """Damped Newton with the dense Hessian and Armijo backtracking: a handful of steps.

    Stops at the gradient tolerance or when the Newton decrement g^T H^-1 g falls to the
    precision of the objective (float32 cannot resolve smaller decreases).
    """
    theta = start.clone()
    value, grad = obj.value_and_grad(theta)
    eps = float(torch.finfo(theta.dtype).eps)
    iterations, evaluations = 0, 1
    while iterations < min(args.max_iter, 100) and float(grad.abs().max()) > tol:
        step = torch.cholesky_solve(grad[:, None], _damped_cholesky(obj.dense_hessian(theta)))[:, 0]
        decrement = float(grad @ step)
        if 0.5 * decrement <= 10 * eps * max(1.0, abs(value)):
            break  # at the precision floor
        a, accepted = 1.0, False
        for _ in range(30):
            cand = theta - a * step
            v_new, g_new = obj.value_and_grad(cand)
            evaluations += 1
            if v_new <= value - 1e-4 * a * decrement:
                accepted = True
                break
            a *= 0.5
        iterations += 1
        if not accepted:
            break
        theta, value, grad = cand, v_new, g_new
    return theta, value, grad, iterations, evaluations


def _damped_cholesky(h: torch.Tensor) -> torch.Tensor:
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
