"""A streamed minibatch warm-up before the full-batch solver (issue 6).

Every L-BFGS evaluation of the head objective is one full pass over the embeddings, so on
large sets the fit's cost is its number of evaluations. The warm-up spends a few epochs of
stochastic steps on the SAME objective, J = (1/N) sum_b L_b + (lambda/2) ||theta - theta_0||^2,
one step per group of the partition's own batches (the gradient of those batches scaled by
num_batches / batches_in_step, so it estimates the full data term; the L2 pull exact), and
hands its point to the full-batch solver as a start. The solver still runs to its gradient
tolerance, so the optimum is the same one (the objective is strongly convex); the warm-up
only decides how far the solver has to go.

The optimiser is Adam with ONE second moment for all entries (momentum SGD normalised by the
running RMS of the gradient): scale-free like Adam, but it keeps the gradient's direction.
Per-entry Adam moves entries the data barely determines by a full step each time, and the
L-BFGS then spends passes pulling them back along curvature ~lambda (measured: 23 -> 28-37
passes on rotated pairs at 100k, against 23 -> 16 with the shared moment). The peak step
(RMS per entry of M) is 1/sqrt(sqrt(d_img d_txt) * steps) unless given, with a short linear
ramp-up and a linear decay to zero, so the last steps average the minibatch noise away.

Batches are read in partition order, a chunk of consecutive batches at a time, exactly as a
full pass reads them (a grouped partition keeps every batch inside one input shard, so the
reads walk the shards in order); an epoch costs about one full evaluation plus the per-step
overhead.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ecif.engine.batches import CHUNK_ROWS, Chunk, iter_chunks
from ecif.engine.head import Head, HeadObjective
from ecif.engine.row_sums import FixedChunks

AUTO_EPOCHS = 2  # epochs when warmup_epochs is None and the warm-up is on
AUTO_LR = 1.0  # warmup_lr None: AUTO_LR / sqrt(sqrt(d_img d_txt) * steps), at most MAX_AUTO_LR
MAX_AUTO_LR = 0.1
AUTO_MIN_PAIRS = 50_000  # auto: warm up only the L-BFGS path, from this many training pairs
RAMP = 0.05  # share of the steps spent ramping the step size up from zero
BETAS = (0.9, 0.999)


def check_warmup_args(epochs: int | None, lr: float | None, batches_per_step: int) -> None:
    """Clear errors for bad warm-up settings, before any data is read."""
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int | np.integer) or epochs < 0
    ):
        raise ValueError(f"warmup_epochs must be None (auto) or an integer >= 0; got {epochs!r}")
    if lr is not None and not (
        isinstance(lr, int | float) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0
    ):
        raise ValueError(f"warmup_lr must be None (auto) or a positive finite number; got {lr!r}")
    if (
        isinstance(batches_per_step, bool)
        or not isinstance(batches_per_step, int | np.integer)
        or batches_per_step < 1
    ):
        raise ValueError(f"warmup_batches must be an integer >= 1; got {batches_per_step!r}")


def auto_epochs(epochs: int | None, optimizer: str, n_pairs: int, warm_start: bool) -> int:
    """Epochs to run: as asked, or (None) AUTO_EPOCHS on the L-BFGS path for large sets.

    Auto leaves Newton fits (small heads), small sets and warm starts (refits from a fitted
    head, already at or near the optimum) untouched, so they stay bit-identical.
    """
    if epochs is not None:
        return int(epochs)
    if optimizer == "lbfgs" and n_pairs >= AUTO_MIN_PAIRS and not warm_start:
        return AUTO_EPOCHS
    return 0


def auto_lr(head: Head, total_steps: int) -> float:
    """Peak RMS step per entry of M: O(1/sqrt(T)) as in stochastic convex optimisation, and
    1/sqrt(width) so the step in operator norm does not grow with the embedding width
    (measured at d = 128: 0.003 for 782 steps; see benchmarks/README.md)."""
    width = math.sqrt(head.m.shape[0] * head.m.shape[1])
    return min(MAX_AUTO_LR, AUTO_LR / math.sqrt(width * max(total_steps, 1)))


def _chunk_objective(head: Head, chunk: Chunk, weight: float) -> HeadObjective:
    """The head objective over an already gathered stack of batches."""
    return HeadObjective(head, None, None, weight=weight, rows=FixedChunks([chunk]))


def _split(ch: Chunk, k: int):
    for s in range(0, len(ch.batch_ids), k):
        yield Chunk(
            x=ch.x[s : s + k],
            y=ch.y[s : s + k],
            mask=ch.mask[s : s + k],
            rows=ch.rows[s : s + k],
            batch_ids=ch.batch_ids[s : s + k],
        )


def minibatch_warmup(
    head: Head,
    x,
    y,
    start: torch.Tensor,
    *,
    epochs: int,
    lr: float | None = None,
    batches_per_step: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """RMS-normalised momentum steps over the partition's batches from ``start``.

    Returns (theta, info).

    ``info`` records the epochs and steps, the seconds spent, and the mean minibatch
    estimate of J over the first and the last epoch (a cheap check that it went downhill).
    Falls back to ``start`` if the iterate ever turns non-finite.
    """
    from tqdm.auto import tqdm

    check_warmup_args(epochs, lr, batches_per_step)
    nb = head.partition.num_batches
    k = min(int(batches_per_step), nb)
    steps_per_epoch = -(-nb // k)
    total = epochs * steps_per_epoch
    if lr is None:
        lr = auto_lr(head, total)
    per_chunk = k * max(1, (CHUNK_ROWS // head.partition.width) // k)  # whole steps per chunk read
    theta = start.detach().clone()
    m1 = torch.zeros_like(theta)
    m2 = torch.zeros((), dtype=theta.dtype, device=theta.device)  # one second moment: RMS
    b1, b2 = BETAS
    ramp = max(1, int(RAMP * total))
    step, epoch_means, finite = 0, [], True
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="fit warm-up", unit="step", disable=not progress)
    for _epoch in range(epochs):
        acc = 0.0
        for ch in iter_chunks(
            x,
            y,
            head.partition,
            dtype=head.dtype,
            device=head.m.device,
            batches_per_chunk=per_chunk,
        ):
            for part in _split(ch, k):
                value, grad = _chunk_objective(head, part, nb / len(part.batch_ids)).value_and_grad(
                    theta
                )
                acc += value * len(part.batch_ids) / nb
                step += 1
                a = lr * min(1.0, step / ramp) * (1.0 - (step - 1) / total)
                m1.mul_(b1).add_(grad, alpha=1 - b1)
                m2.mul_(b2).add_(grad.pow(2).mean(), alpha=1 - b2)
                rms = (m2 / (1 - b2**step)).sqrt_().clamp_(min=1e-30)
                theta.sub_(m1 * (a / (1 - b1**step)) / rms)
            bar.update(math.ceil(len(ch.batch_ids) / k))
        epoch_means.append(acc)
        if not (math.isfinite(acc) and bool(torch.isfinite(theta).all())):
            finite = False
            break
    bar.close()
    info = {
        "epochs": int(epochs),
        "steps": int(step),
        "batches_per_step": k,
        "lr": float(lr),
        "seconds": time.perf_counter() - t0,
        "first_epoch_objective": epoch_means[0] if epoch_means else None,
        "last_epoch_objective": epoch_means[-1] if epoch_means else None,
        "finite": finite,
    }
    if not finite:
        return start.detach().clone(), info
    return theta, info
