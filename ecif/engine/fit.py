"""Fitting the head: damped Newton for small heads, L-BFGS for large ones, to a tolerance.

The objective is strongly convex in M, so both reach the unique optimum. L-BFGS hands over
to Newton-CG when it stalls or slows down; Newton steps are judged on the gradient where
float32 cannot resolve the objective's decrease (ecif/grad/newton.py). A fit that stops
short of the tolerance says so: ``info["converged"]`` False and a ``ConvergenceWarning``.
On large sets a streamed minibatch warm-up (ecif/engine/warmup.py) gives the full-batch
solver a better start.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ecif.device import DEFAULT_DEVICE, DEVICES, resolve_device
from ecif.engine.batches import make_partition
from ecif.engine.head import (
    CLIP_LOGIT_SCALE,
    DENSE_HESSIAN_MAX_PARAMS,
    DTYPES,
    Head,
    HeadObjective,
)
from ecif.engine.inverse_hessian import (
    AUTO_SAMPLE_RATIO,
    SAMPLE_BATCHES,
    SAMPLE_PAIRS_PER_PARAM,
    SolverArgs,
    newton_cg_direction,
    sample_objective,
    sample_size,
    sampled_inverse,
)
from ecif.engine.precondition import moment_whitener
from ecif.engine.row_sums import LocalRows, RowSource
from ecif.engine.warmup import auto_epochs, check_warmup_args, minibatch_warmup
from ecif.engine.warning_types import NOT_CONVERGED, ConvergenceWarning
from ecif.grad.newton import dense_direction, newton
from ecif.grad.solvers import conjugate_gradient
from ecif.options import borrow, option, renamed

OPTIMIZERS = ("auto", "newton", "lbfgs")


@renamed(solver="optimizer")
@dataclass
class FitArgs:
    """How to fit the head: ``ecif.fit``'s keywords, each default here and nowhere else.
    Defaults suit unit-norm CLIP embeddings."""

    batch_size: int = option(256, help="contrastive batch size of the head's partition")
    seed: int = option(0, help="seed of the batch partition")
    lam: float = option(1e-3, help="L2 pull of the head towards the pretrained model")
    logit_scale: float | None = option(
        None,
        help="logit scale t of the head; None: the training set's own (its embedding model's), "
        f"else {CLIP_LOGIT_SCALE:g}, CLIP's",
    )
    learn_scale: bool = option(False, help="learn the logit scale too")
    dtype: str = option("float32", help="precision of the fit and the scores", choices=DTYPES)
    device: str = option(
        DEFAULT_DEVICE,
        help="where to compute: auto (CUDA when present, else the CPU), cpu or cuda",
        choices=DEVICES,
    )
    max_iter: int = option(500, help="iterations of the optimizer at most")
    tol: float | None = option(
        None, help="tolerance on the gradient's max-abs; None: 1e-5 in float32, 1e-9 in float64"
    )
    history_size: int = option(20, help="L-BFGS history")
    # ecif/engine/precondition.py: the same optimum in far fewer passes on anisotropic
    # (CLIP-like) embeddings
    whiten: bool = option(
        True, help="L-BFGS in variables whitened by the embeddings' second moments"
    )
    newton_steps: int = option(
        0, help="exact Newton-CG steps after L-BFGS (for tight retraining checks)"
    )
    optimizer: str = option(
        "auto",
        help="newton (damped, dense Hessian) or lbfgs; auto: newton while assembling the dense "
        "Hessian a few times costs less than ~100 L-BFGS passes (choose_optimizer), else lbfgs",
        choices=OPTIMIZERS,
    )
    # same optimum, fewer full passes (ecif/engine/warmup.py)
    warmup_epochs: int | None = option(
        None,
        help="epochs of streamed minibatch steps before the full-batch fit, which still runs to "
        "its tolerance (same head, fewer passes over the embeddings); 0 turns it off; auto "
        "(Python: None): 2 from 50k pairs when the head is fit by L-BFGS without a warm start",
    )
    warmup_lr: float | None = option(
        None, help="peak RMS step per entry of M in the warm-up; None: by width and steps"
    )
    warmup_batches: int = option(1, help="partition batches per warm-up step")
    progress: bool = option(False, help="progress bars for the warm-up and the L-BFGS passes")
    # fewer passes at scale: the same optimum, judged on the full gradient (fit_on_sample)
    sample_batches: int | None = borrow(
        SolverArgs,
        "sample_batches",
        help="L-BFGS fits first on a sample of this many batches, then Newton steps on all the "
        "pairs take their curvature from that sample; the fit still stops on the full "
        f"gradient's tolerance. None: auto (at least {SAMPLE_BATCHES} batches and "
        f"{SAMPLE_PAIRS_PER_PARAM} pairs a parameter, where the partition has "
        f"{AUTO_SAMPLE_RATIO}x as many batches, without a warm start), 0: off",
    )


def new_head(
    x,
    y,
    args: FitArgs,
    m0: torch.Tensor | None = None,
    groups: np.ndarray | None = None,
    members: np.ndarray | None = None,
) -> Head:
    """The starting point theta_0: identity adapter (rectangular identity if widths differ).
    ``members``: the row positions that take part (the batches and 1/N of fitting them
    alone); the other rows are in no batch (an audit's exact copies of a pair)."""
    dtype = DTYPES[args.dtype]
    di, dt = int(x.shape[1]), int(y.shape[1])
    if m0 is None:
        m0 = torch.eye(di, dt, dtype=dtype, device=resolve_device(args.device))
    scale = CLIP_LOGIT_SCALE if args.logit_scale is None else args.logit_scale
    if scale <= 0:
        raise ValueError("logit_scale must be positive")
    tau0 = math.log(scale)
    if members is None:
        part = make_partition(len(x), args.batch_size, args.seed, groups=groups)
    else:
        members = np.asarray(members, dtype=np.int64)
        sub = None if groups is None else np.asarray(groups)[members]
        part = make_partition(len(members), args.batch_size, args.seed, groups=sub)
        part = part.of_rows(members, len(x))
    return Head(
        m=m0.clone(),
        m0=m0.clone(),
        log_scale=tau0,
        log_scale0=tau0,
        learn_scale=args.learn_scale,
        lam=args.lam,
        partition=part,
        n_norm=len(x) if members is None else len(members),
    )


NEWTON_MAX_PARAMS = DENSE_HESSIAN_MAX_PARAMS  # Newton assembles the dense Hessian: not above


def choose_optimizer(head: Head) -> str:
    """Damped Newton or L-BFGS by estimated flops: Newton assembles the dense Hessian (about
    4 N P^2 flops) some 6 times; L-BFGS makes some 100 passes of about N (4 P + 4 B d) flops.
    At d = 64 and N = 2,000 the Hessian alone costs 50x the whole L-BFGS fit (measured: 35 s
    vs 3 s), at d = 8 it is negligible and Newton's precision is free."""
    p = head.num_params
    if p > NEWTON_MAX_PARAMS:
        return "lbfgs"
    n = int((head.partition.index >= 0).sum())
    d = 0.5 * sum(head.m.shape)
    newton = 6 * 4.0 * n * p * p
    lbfgs = 100 * n * (4.0 * p + 4.0 * head.partition.width * d)
    return "newton" if newton <= lbfgs else "lbfgs"


def fit_head(
    head: Head,
    x,
    y,
    args: FitArgs,
    init: Head | None = None,
    rows: RowSource | None = None,
) -> Head:
    """Fit to a gradient tolerance: damped Newton (dense Hessian) for small heads, full-batch
    L-BFGS (strong Wolfe) for large ones; warm start from ``init``. ``rows``: where the
    passes run (default: this process; ``ClusterRows``: a Dask cluster's workers, and the
    auto warm-up, which streams every row through this process, stays off)."""
    if head.lam <= 0:
        raise ValueError("lam must be > 0: the L2 pull makes the Hessian invertible")
    obj = HeadObjective(head, x, y, rows=rows)
    start = (
        head.theta() if init is None else init.theta().to(dtype=head.dtype, device=head.m.device)
    )
    if start.numel() != head.num_params:
        raise ValueError("init head has a different shape or learn_scale setting")
    tol = args.tol if args.tol is not None else (1e-9 if head.dtype == torch.float64 else 1e-5)
    optimizer = args.optimizer
    if optimizer == "auto":
        optimizer = choose_optimizer(head)
    if optimizer not in OPTIMIZERS[1:]:
        raise ValueError(f"optimizer must be auto, newton or lbfgs; got {args.optimizer!r}")
    check_warmup_args(args.warmup_epochs, args.warmup_lr, args.warmup_batches)
    members = int((head.partition.index >= 0).sum())
    remote = rows is not None and not isinstance(rows, LocalRows)  # the warm-up streams here
    k = sample_size(args.sample_batches, head)
    k = k if optimizer == "lbfgs" and (init is None or args.sample_batches) else 0
    epochs = auto_epochs(
        args.warmup_epochs,
        optimizer,
        members,
        warm_start=init is not None or remote or k > 0,
    )
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
    count, counted = obj.rows.count, obj.rows.count.computed
    if optimizer == "newton":
        theta, value, grad, iterations, evaluations, stop = newton(
            obj, start, dense_direction(obj), tol, args.max_iter
        )
    elif k:
        theta, value, grad, iterations, evaluations, stop = fit_on_sample(obj, start, args, tol, k)
    else:
        theta, value, grad, iterations, evaluations, stop = _lbfgs(obj, start, args, tol)
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
        "optimizer": optimizer,
        "solver": optimizer,  # its old name, kept for one release
        "iterations": iterations,
        "evaluations": evaluations,  # full-batch passes of the solver (the warm-up's aside)
        # batches computed / batches: full passes' worth, sample passes included
        "passes": (count.computed - counted) / head.partition.num_batches,
        "sample_batches": k,
        "converged": gmax <= tol,
        # tol, max_iter, precision or direction (ecif/grad/newton.py)
        "stop": "tol" if gmax <= tol else stop,
        "tol": tol,
        "warmup": warmup,  # None, or the warm-up's epochs, steps, seconds (warmup.py)
    }
    if not info["converged"]:
        warnings.warn(_not_converged_message(info, head.dtype), ConvergenceWarning, stacklevel=3)
    return head.with_theta(theta.detach(), info=info)


def fit_on_sample(obj: HeadObjective, start: torch.Tensor, args: FitArgs, tol: float, k: int):
    """L-BFGS on a ``k``-batch sample's objective (its passes cost k/num_batches of one),
    then Newton steps on the full objective with directions solved on the sample's Hessian
    (one full pass a step, plus the line search's). Where those stop short of ``tol``, the
    full-data L-BFGS takes over from there. Returns what ``_lbfgs`` returns (full passes)."""
    sample = sample_objective(obj, k, args.seed + 1, SolverArgs().cache_bytes)
    # where L-BFGS slows down on the sample, the Newton steps below take over at once: past
    # the sample's sampling error (its gradient's distance from the full one) a Newton-CG
    # finish on the sample alone would only refine the sample's optimum, not the full one
    theta, *_ = _lbfgs(sample, start, args, tol, finish=False)

    def direction(at: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        return sampled_inverse(sample, at)(grad), 0  # sample passes only: counted apart

    theta, value, grad, its, passes, stop = newton(obj, theta, direction, tol, args.max_iter)
    if stop in ("tol", "max_iter"):
        return theta, value, grad, its, passes, stop
    theta, value, grad, more, spent, stop = _lbfgs(obj, theta, args, tol)
    return theta, value, grad, its + more, passes + spent, stop


def _not_converged_message(info: dict, dtype: torch.dtype) -> str:
    what = (
        f"head fit {NOT_CONVERGED}: gradient max-abs {info['grad_max']:.2e} > tol "
        f"{info['tol']:.0e} after {info['iterations']} {info['optimizer']} iterations"
    )
    if info["stop"] == "max_iter":
        hint = "raise max_iter (or warm-start with init=head)"
    elif info["stop"] == "direction":
        hint = "Newton-CG found no descent direction (learned scale?); try optimizer='newton'"
    else:
        hint = (
            f"no step lowers the gradient any more at {str(dtype).replace('torch.', '')} "
            "precision; fit with dtype='float64', a larger lam, or a tol above the gradient "
            "reached"
        )
    return (
        f"{what}; {hint}. Influence assumes a stationary head: scores of a head that is not "
        "converged are not meaningful (see head.info)."
    )


class _Converged(Exception):
    """Raised from the L-BFGS closure once the true gradient meets the tolerance."""


class _Handover(Exception):
    """Raised from the L-BFGS closure when it has slowed down: Newton-CG takes over."""


# L-BFGS hands over to Newton-CG when its best gradient fell less than HANDOVER_FACTOR in the
# last HANDOVER_PASSES passes: a Newton-CG step costs ~35 passes (EK-FAC build + CG products)
# and gains ~100x, while late L-BFGS crawls (10k x 128 CLIP-like pairs, float64: 8e-7 at
# pass 190, 3.3e-7 at pass 430; from 7e-3 at pass 55, 4 Newton-CG steps gave 1.8e-9)
HANDOVER_PASSES = 30
HANDOVER_FACTOR = 10.0


def _lbfgs(obj: HeadObjective, start: torch.Tensor, args: FitArgs, tol: float, finish: bool = True):
    """torch's L-BFGS on phi with theta = base + L phi (L symmetric: the whitening, or the
    identity); stops on the gradient in theta, the quantity ``tol`` is about. Where it stalls
    or slows down short of ``tol``, Newton-CG (EK-FAC preconditioned) finishes the fit; if
    that finds no descent direction (learned scale, far out), L-BFGS resumes without
    handing over. ``finish`` False: where it slows down it returns its best point instead
    (stop "handover"), for the caller's own finish (``fit_on_sample``)."""
    from tqdm.auto import tqdm

    lin = moment_whitener(obj.head, obj.x, obj.y) if args.whiten else (lambda v: v)
    bar = tqdm(desc="fit (L-BFGS)", unit="pass", disable=not args.progress)
    last: list = []  # (theta, value, grad) of the latest full pass
    best: list = []  # and of the lowest objective seen (where Newton-CG takes over)
    history: list[float] = []  # best gradient max-abs so far, per pass
    passes = [0]

    def evaluate(at: torch.Tensor):
        if last and torch.equal(last[0], at):
            return last[1], last[2]  # torch's L-BFGS often ends on its latest evaluated point
        value, grad = obj.value_and_grad(at)
        last[:] = [at.clone(), value, grad]
        if not best or value < best[1]:
            best[:] = last
        gmax = float(grad.abs().max())
        history.append(min(gmax, history[-1]) if history else gmax)
        passes[0] += 1
        bar.update(1)
        bar.set_postfix(grad_max=f"{gmax:.2e}", refresh=False)
        return value, grad

    def run(base: torch.Tensor, iterations: int, handover: bool) -> tuple[int, bool]:
        """L-BFGS with restarts from ``base``; (iterations, whether it handed over)."""
        history.clear()
        for _restart in range(5):  # L-BFGS can stop on a zero step before the tolerance
            phi = torch.nn.Parameter(torch.zeros_like(start))
            left = max(args.max_iter - iterations, 1)
            opt = torch.optim.LBFGS(
                [phi],
                lr=1.0,
                max_iter=left,
                max_eval=int(left * 1.5),
                tolerance_grad=0.0,  # the closure checks the gradient in theta
                tolerance_change=0.0,
                history_size=args.history_size,
                line_search_fn="strong_wolfe",
            )

            def closure(phi=phi, base=base):
                value, grad = evaluate(base + lin(phi.detach()))
                if float(grad.abs().max()) <= tol:
                    raise _Converged
                k = HANDOVER_PASSES
                if (
                    handover
                    and len(history) > k
                    and history[-1 - k] < HANDOVER_FACTOR * history[-1]
                ):
                    raise _Handover
                phi.grad = lin(grad)
                return torch.tensor(value, dtype=phi.dtype)

            outcome = None
            try:
                opt.step(closure)
            except (_Converged, _Handover) as e:
                outcome = e  # ``last`` met the tolerance (a line-search trial, maybe)
            done = int(opt.state[phi].get("n_iter", 0))
            iterations += done
            if isinstance(outcome, _Converged):
                return iterations, False
            if isinstance(outcome, _Handover):
                last[:] = best
                return iterations, True
            base = base + lin(phi.detach())
            _, grad = evaluate(base)
            if float(grad.abs().max()) <= tol or iterations >= args.max_iter:
                break
            if done <= 1:  # a zero step at once: the line search is at the loss's precision
                break
        return iterations, False

    # not with a learned scale: EK-FAC then preconditions CG poorly (its Schur complement of
    # the scale is negative even at the optimum), measured 373 passes against 123 without
    iterations, handed_over = run(start.clone(), 0, handover=not obj.head.learn_scale)
    stop = "tol"
    if handed_over and not finish:
        bar.close()
        theta, value, grad = last
        return theta, value, grad, iterations, passes[0], "handover"
    while float(last[2].abs().max()) > tol:
        if iterations >= args.max_iter:
            stop = "max_iter"
            break
        # stalled or slowed down short of tol: Newton-CG, its steps judged as in ecif/grad/newton.py
        theta, value, grad, its, spent, stop = newton(
            obj, last[0], newton_cg_direction(obj), tol, args.max_iter - iterations, start=last[1:]
        )
        last[:] = [theta, value, grad]
        iterations += its
        passes[0] += spent
        if stop != "direction" or not handed_over:
            break
        iterations, handed_over = run(theta, iterations, handover=False)
    bar.close()
    theta, value, grad = last
    return theta, value, grad, iterations, passes[0], stop
