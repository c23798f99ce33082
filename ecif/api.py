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
from ecif.engine.fit import FitArgs, fit_head, new_head
from ecif.engine.head import Head, as_arrays
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
    out_dtype = np.float64 if head.dtype == torch.float64 else np.float32  # keep the head's
    df = pd.DataFrame(
        {
            "id": _ids(train),
            "influence": ((d_pos + d_neg) / head.n_norm).astype(out_dtype),
            "influence_pos": (d_pos / head.n_norm).astype(out_dtype),
            "influence_neg": (d_neg / head.n_norm).astype(out_dtype),
        }
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
    The numerator needs one solve, w = H^-1 g_test, and the scoring pass's directional
    derivative; ||d_n|| is a per-pair solve when the solver is exact, else EK-FAC's closed
    form ||(Q1^T G_n Q2) / D||_F (``attrs["norm"]`` says which). G_n is assembled from its
    low-rank structure (never the B x B logit gradient), so a pair costs about 4 B d^2 flops.
    """
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
    slot = np.full(head.partition.n, -1, dtype=np.int64)
    slot[rows] = np.arange(len(rows))
    mats = [head.m, wm] + ([ek.q1] if ek is not None else [])
    mw = torch.cat(mats, dim=1)
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
        at = slot[np.where(ch.mask.cpu().numpy(), ch.rows, 0)]
        ci, ni = np.nonzero((at >= 0) & ch.mask.cpu().numpy())
        out = at[ci, ni]
        terms = _removal_terms(s, ds, ch.mask, neg)
        dot[out] = terms["dot"][ci, ni].cpu().numpy()
        xs, ys = (u[..., 2 * dt :], ch.y @ ek.q2) if ek is not None else (ch.x, ch.y)
        gm = t * _removal_grad_m(terms, xs, ys, ci, ni)
        if ek is not None:
            norm[out] = (gm / ek.diag).flatten(1).norm(dim=1).cpu().numpy()
        else:
            grads = _flat(head, gm, _removal_grad_tau(terms, s, ci, ni))
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


def _removal_terms(s: torch.Tensor, ds: torch.Tensor, mask: torch.Tensor, neg: str) -> dict:
    """Softmaxes, removal weights A (rows) and Bq (columns), and dR_n along ds, per batch.

    dR_n/dS = e_n (p_n - e_n + Bq_n.)^T + (q_.n - e_n + A_.n) e_n^T - diag(A_.n) P - Q diag(Bq_n.)
    (ecif-math.md sections 3 and 5), which is what ``_removal_grad_m`` contracts.
    """
    from ecif.engine.contrastive import _side_weights

    full = bool(mask.all())
    s_t, ds_t = s.transpose(-1, -2), ds.transpose(-1, -2)
    if full:
        s_r, s_c = s, s_t.contiguous()
    else:
        s_r = s.masked_fill(~mask[:, None, :], float("-inf"))
        s_c = s_t.masked_fill(~mask[:, None, :], float("-inf")).contiguous()
    p = torch.softmax(s_r, -1) * mask[:, :, None]  # rows: image -> text
    qt = torch.softmax(s_c, -1) * mask[:, :, None]  # qt[j, i] = q_ij: text -> image
    r, a = _side_weights(s_r, ds, neg)  # a[k, n] = A_kn
    c, b = _side_weights(s_c, ds_t.contiguous(), neg)  # b[k, n] = Bq_nk
    if not full:
        a.mul_(mask[:, :, None])
        b.mul_(mask[:, :, None])
    d_neg = (a * (ds - r)).sum(-2) + (b * (ds_t - c)).sum(-2)
    d_pos = -2.0 * ds.diagonal(dim1=-2, dim2=-1) + r[..., 0] + c[..., 0]
    return {"p": p, "qt": qt, "a": a, "b": b, "dot": d_pos + d_neg}


def _removal_grad_m(terms: dict, xs: torch.Tensor, ys: torch.Tensor, ci, ni) -> torch.Tensor:
    """X^T (dR_n/dS) Y for members (ci, ni) of the stack, without forming dR_n/dS: (K, di, dt)."""
    p, qt, a, b = terms["p"], terms["qt"], terms["a"], terms["b"]
    ci, ni = torch.as_tensor(ci), torch.as_tensor(ni)
    eye = torch.zeros(len(ci), p.shape[-1], dtype=p.dtype, device=p.device)
    eye[torch.arange(len(ci)), ni] = 1.0
    r1 = p[ci, ni, :] - eye + b[ci, :, ni]
    c1 = qt[ci, ni, :] - eye + a[ci, :, ni]
    xk, yk = xs[ci], ys[ci]  # (K, B, d)
    out = xs[ci, ni][:, :, None] * torch.einsum("kb,kbj->kj", r1, yk)[:, None, :]
    out += torch.einsum("kb,kbi->ki", c1, xk)[:, :, None] * ys[ci, ni][:, None, :]
    ybar = p @ ys  # (c, B, dt): sum_j p_kj y_j
    xbar = qt @ xs  # (c, B, di): sum_i q_ik x_i
    left = torch.cat([xk * a[ci, :, ni, None], xbar[ci] * b[ci, :, ni, None]], dim=1)
    out -= left.transpose(1, 2) @ torch.cat([ybar[ci], yk], dim=1)
    return out


def _removal_grad_tau(terms: dict, s: torch.Tensor, ci, ni) -> torch.Tensor:
    """d R_n / d log t = sum (dR_n/dS) * S for members (ci, ni)."""
    p, qt, a, b = terms["p"], terms["qt"], terms["a"], terms["b"]
    ci, ni = torch.as_tensor(ci), torch.as_tensor(ni)
    eye = torch.zeros(len(ci), p.shape[-1], dtype=p.dtype, device=p.device)
    eye[torch.arange(len(ci)), ni] = 1.0
    rs = (p * s).sum(-1)  # sum_j p_kj S_kj
    cs = (qt * s.transpose(-1, -2)).sum(-1)  # sum_i q_ik S_ik
    r1 = p[ci, ni, :] - eye + b[ci, :, ni]
    c1 = qt[ci, ni, :] - eye + a[ci, :, ni]
    return (
        (r1 * s[ci, ni, :]).sum(-1)
        + (c1 * s[ci, :, ni]).sum(-1)
        - (a[ci, :, ni] * rs[ci]).sum(-1)
        - (b[ci, :, ni] * cs[ci]).sum(-1)
    )


__all__ = [
    "classification_gradient",
    "fit",
    "loss_gradient",
    "relative_influence",
    "score",
    "self_influence",
    "solver",
]
