"""The Python front door: fit a head, score pairs, solve per-pair influence.

train = ecif.EmbeddingSet(image=..., text=..., ids=...)
head = ecif.fit(train, batch_size=256, seed=0)
df = ecif.score(head, train, val=val_set)
head2 = ecif.fit(train, batch_size=256, seed=0, exclude=[...], init=head)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ecif.engine.batches import iter_chunks
from ecif.engine.head import FitArgs, Head, as_arrays, fit_head, new_head
from ecif.engine.influence import classification_gradient, pair_gradients, score_pass
from ecif.engine.influence import loss_gradient as _loss_gradient
from ecif.engine.inverse_hessian import InverseHessian, SolverArgs


def _ids(data) -> np.ndarray:
    x, _ = as_arrays(data)
    return np.asarray(getattr(data, "ids", np.arange(len(x))))


def _positions(data, ids: Sequence[Any] | np.ndarray) -> np.ndarray:
    if hasattr(data, "positions"):
        return data.positions(ids)
    return np.asarray(ids, dtype=np.int64)


def _check_widths(head: Head, data, what: str) -> None:
    x, y = as_arrays(data)
    if len(x) == 0:
        raise ValueError(f"the {what} set is empty")
    if (x.shape[1], y.shape[1]) != tuple(head.m.shape):
        raise ValueError(
            f"the {what} set has widths image={x.shape[1]}, text={y.shape[1]} but the head was fit "
            f"on image={head.m.shape[0]}, text={head.m.shape[1]}: embed both with the same model"
        )


def fit(
    train,
    *,
    batch_size: int = 256,
    seed: int = 0,
    lam: float = 1e-3,
    logit_scale: float | None = None,
    learn_scale: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    exclude: Sequence[Any] | None = None,
    init: Head | None = None,
    max_iter: int = 500,
    tol: float | None = None,
    newton_steps: int = 0,
    solver: str = "auto",
    groups: np.ndarray | None = None,
) -> Head:
    """Fit the bilinear head on ``train`` to a stationary point.

    ``exclude``: ids removed from their batches (the partition of ``init`` or of ``seed`` is
    kept; the per-pair weight 1/N stays that of the full set, so a removal deletes exactly
    that pair's terms). ``init``: warm start (and its partition). ``groups``: a label per row
    (the input shard); batches never cross groups, so shards can be scored one by one.
    ``logit_scale`` defaults to the set's own (``train.logit_scale``) or 100, CLIP's.
    """
    x, y = as_arrays(train)
    if len(x) < 2:
        raise ValueError(f"need at least 2 pairs to fit a contrastive head; got {len(x)}")
    if logit_scale is None:
        logit_scale = float(getattr(train, "logit_scale", None) or 100.0)
    args = FitArgs(
        batch_size=batch_size,
        seed=seed,
        lam=lam,
        logit_scale=logit_scale,
        learn_scale=learn_scale,
        dtype=dtype,
        device=device,
        max_iter=max_iter,
        tol=tol,
        newton_steps=newton_steps,
        solver=solver,
    )
    head = new_head(x, y, args, groups=groups)
    if init is not None:
        if init.partition.n != len(x):
            raise ValueError(f"init was fit on {init.partition.n} pairs, train has {len(x)}")
        head = replace(
            head, partition=init.partition, m0=init.m0.to(head.dtype), log_scale0=init.log_scale0
        )
    if exclude is not None and len(exclude):
        head = replace(head, partition=head.partition.without(_positions(train, exclude)))
    return fit_head(head, x, y, args, init=init)


def loss_gradient(head: Head, data) -> torch.Tensor:
    """Gradient of the mean symmetric InfoNCE on ``data`` w.r.t. the head's parameters."""
    _check_widths(head, data, "query")
    x, y = as_arrays(data)
    return _loss_gradient(head, x, y)


def solver(head: Head, train, *, method: str = "auto", **kw) -> InverseHessian:
    """The inverse-Hessian operator of a fitted head (``exact``, ``cg``, ``ekfac``, ``auto``)."""
    x, y = as_arrays(train)
    return InverseHessian(head, x, y, SolverArgs(method=method, **kw))


def score(
    head: Head,
    train,
    val=None,
    *,
    query_grad: torch.Tensor | None = None,
    neg: str = "exact",
    method: str = "auto",
    inverse: InverseHessian | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Influence of every training pair on the validation loss, one row per pair in train order.

    Columns: id, influence, influence_pos, influence_neg. ``influence`` is the predicted change
    of the validation loss if the pair is removed: negative = removing it helps = harmful.
    Give ``val`` (an EmbeddingSet) or ``query_grad`` (a flat gradient, e.g. of a test loss).
    """
    _check_widths(head, train, "training")
    x, y = as_arrays(train)
    if query_grad is None:
        if val is None:
            raise ValueError(
                "score needs a validation set (val=) or a query gradient (query_grad=)"
            )
        _check_widths(head, val, "validation")
        vx, vy = as_arrays(val)
        query_grad = _loss_gradient(head, vx, vy)
    inv = inverse or InverseHessian(head, x, y, SolverArgs(method=method))
    w = inv.solve(query_grad.to(head.dtype))
    bar = tqdm(total=head.partition.num_batches, desc="scoring", unit="batch", disable=not progress)
    d_pos, d_neg = score_pass(head, x, y, w, neg=neg, progress=bar.update)
    bar.close()
    df = pd.DataFrame(
        {
            "id": _ids(train),
            "influence": ((d_pos + d_neg) / head.n_norm).astype(np.float32),
            "influence_pos": (d_pos / head.n_norm).astype(np.float32),
            "influence_neg": (d_neg / head.n_norm).astype(np.float32),
        }
    )
    if head.dtype == torch.float64:
        df[["influence", "influence_pos", "influence_neg"]] = np.stack(
            [(d_pos + d_neg) / head.n_norm, d_pos / head.n_norm, d_neg / head.n_norm], axis=1
        )
    df.attrs.update(solver=dict(inv.info), neg=neg)
    return df


def self_influence(
    head: Head,
    train,
    rows: Sequence[int] | None = None,
    *,
    neg: str = "exact",
    inverse: InverseHessian | None = None,
) -> np.ndarray:
    """grad R_n^T H^-1 grad R_n for the given row positions (all rows if None).

    Scores pairs without a validation set: a large value means the model bends far to fit
    the pair. Costs a per-pair gradient (B^2 d + B d^2) and a solve per pair.
    """
    x, y = as_arrays(train)
    rows = np.arange(len(x)) if rows is None else np.asarray(rows)
    inv = inverse or InverseHessian(head, x, y, SolverArgs(method="auto"))
    out = np.zeros(len(rows))
    for start in range(0, len(rows), 256):
        sel = rows[start : start + 256]
        g_pos, g_neg = pair_gradients(head, x, y, sel, neg=neg)
        out[start : start + len(sel)] = inv.quad_form(g_pos + g_neg).cpu().numpy()
    return out


def relative_influence(
    head: Head,
    train,
    query_grad: torch.Tensor,
    rows: Sequence[int],
    *,
    neg: str = "exact",
    inverse=None,
    batches_per_step: int = 8,
) -> pd.DataFrame:
    """RelatIF-style trace-back: g_test^T d_n / ||d_n||, d_n = H^-1 grad R_n, for candidate rows.

    Negative = removing the pair would lower the test loss (it pushed the model towards the
    mistake); positive = it helped. Also returns the raw influence g_test^T d_n / N.
    The numerator needs one solve, w = H^-1 g_test, and a directional derivative per pair;
    ||d_n|| is a per-pair solve when the solver is exact, else EK-FAC's closed form
    ||(Q1^T G_n Q2) / D||_F (``attrs["norm"]`` says which).
    """
    from ecif.engine.contrastive import batch_stats, removal_grad_logits, removal_weights
    from ecif.engine.influence import _flat, _unflat

    x, y = as_arrays(train)
    rows = np.asarray(rows, dtype=np.int64)
    inv = inverse or InverseHessian(head, x, y, SolverArgs(method="auto"))
    w = inv.solve(query_grad.to(head.dtype))
    wm, w_tau = _unflat(head, w)
    ek = inv._ekfac if inv.method != "exact" and not head.learn_scale else None
    t = head.logit_scale
    batch_of = head.partition.batch_of()
    if len(rows) and (batch_of[rows] < 0).any():
        raise ValueError("some rows are not in the head's partition (removed pairs)")
    dot = np.zeros(len(rows))
    norm = np.zeros(len(rows))
    slot = {int(r): i for i, r in enumerate(rows)}
    wanted = np.zeros(head.partition.n, dtype=bool)
    wanted[rows] = True
    mw = torch.cat([head.m, wm] + ([ek.q1] if ek is not None else []), dim=1)
    dt = head.m.shape[1]
    for ch in iter_chunks(
        x,
        y,
        head.partition,
        dtype=head.dtype,
        device=head.m.device,
        batches_per_chunk=batches_per_step,
        batch_ids=np.unique(batch_of[rows]),
    ):
        u = ch.x @ mw  # X M, X W (and X Q1) for the stack in one matmul
        yt = ch.y.transpose(-1, -2)
        s = t * u[..., :dt] @ yt
        ds = t * u[..., dt : 2 * dt] @ yt
        if w_tau is not None:
            ds = ds + w_tau * s
        st = batch_stats(s, ch.mask)
        rw = removal_weights(s, st, neg)
        for c in range(len(ch.batch_ids)):
            members = np.nonzero(wanted[np.where(ch.mask[c].cpu().numpy(), ch.rows[c], 0)])[0]
            members = members[ch.mask[c].cpu().numpy()[members]]
            if not len(members):
                continue
            st_c = type(st)(*(getattr(st, f)[c : c + 1] for f in st.__dataclass_fields__))
            rw_c = type(rw)(*(getattr(rw, f)[c : c + 1] for f in rw.__dataclass_fields__))
            g_pos, g_neg = removal_grad_logits(st_c, rw_c, torch.as_tensor(members))
            gs = g_pos + g_neg  # dR_n/dS, (K, B, B)
            out = [slot[int(r)] for r in ch.rows[c][members]]
            dot[out] = (gs * ds[c]).sum((1, 2)).cpu().numpy()
            if ek is not None:
                rot = t * torch.einsum("bi,kbj->kij", u[c, :, 2 * dt :], gs @ (ch.y[c] @ ek.q2))
                norm[out] = (rot / ek.diag).flatten(1).norm(dim=1).cpu().numpy()
            else:
                gm = t * torch.einsum("bi,kbj->kij", ch.x[c], gs @ ch.y[c])
                grads = _flat(head, gm, (gs * s[c]).sum((1, 2)))
                norm[out] = inv.solve(grads).norm(dim=1).cpu().numpy()
    df = pd.DataFrame(
        {
            "row": rows,
            "id": _ids(train)[rows],
            "relative_influence": dot / np.maximum(norm, 1e-30),
            "influence": dot / head.n_norm,
        }
    )
    df.attrs.update(norm="ekfac" if ek is not None else inv.method, solver=dict(inv.info))
    return df


__all__ = [
    "classification_gradient",
    "fit",
    "loss_gradient",
    "relative_influence",
    "score",
    "self_influence",
    "solver",
]
