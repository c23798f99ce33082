"""ECIF influence of training pairs: the one-pass closed-form scores and per-pair solves.

IS_n = (1/N) w^T grad R_n with w = H^-1 g_val: the predicted change of the validation loss
if pair n is removed (docs/math.md section 4). With w solved once, every pair's score is a
directional derivative of its removal term along w, computed for a whole batch from its
logits and one extra matmul (section 5): no per-pair backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from ecif.engine.batches import Partition, iter_chunks, make_partition
from ecif.engine.contrastive import (
    batch_stats,
    loss_grad_logits,
    removal_directional,
    removal_grad_logits,
    removal_weights,
)
from ecif.engine.head import Head

# rows of a scoring chunk: B x B softmax work over this many rows at a time stays in cache
SCORE_CHUNK_ROWS = 4096


def loss_gradient(head: Head, x, y, partition: Partition | None = None) -> torch.Tensor:
    """Gradient of the mean per-pair symmetric InfoNCE on (x, y) w.r.t. theta (no regulariser).

    The set is cut into batches of the head's batch size with the head's seed unless a
    partition is given.
    """
    part = partition or make_partition(len(x), head.batch_size, head.seed)
    t = head.logit_scale
    g_m = torch.zeros_like(head.m)
    g_tau = torch.zeros((), dtype=head.dtype, device=head.m.device)
    count = 0
    for ch in iter_chunks(x, y, part, dtype=head.dtype, device=head.m.device):
        s = t * (ch.x @ head.m) @ ch.y.transpose(-1, -2)
        g = loss_grad_logits(batch_stats(s, ch.mask))
        g_m += t * torch.einsum("cbi,cbj->ij", ch.x, g @ ch.y)
        g_tau += (g * s).sum()
        count += int(ch.mask.sum())
    return head.flatten(g_m / count, g_tau / count)


def classification_gradient(
    head: Head, image: torch.Tensor, class_text: torch.Tensor, label: int
) -> torch.Tensor:
    """Gradient of CE(softmax_j(t x^T M y_j), label) for one image against class prompts.

    The loss a zero-shot misprediction means (docs/math.md section 8); for a retrieval mistake
    pass the ranked candidate captions as ``class_text`` and the correct one as ``label``.
    """
    x = torch.as_tensor(np.asarray(image), dtype=head.dtype, device=head.m.device).reshape(-1)
    yc = torch.as_tensor(np.asarray(class_text), dtype=head.dtype, device=head.m.device)
    if not 0 <= label < yc.shape[0]:
        raise ValueError(f"label {label} out of range for {yc.shape[0]} classes")
    t = head.logit_scale
    logits = t * (x @ head.m) @ yc.T
    p = torch.softmax(logits, dim=0)
    err = p.clone()
    err[label] -= 1.0
    g_m = t * torch.outer(x, err @ yc)
    return head.flatten(g_m, (err * logits).sum())


def score_pass(
    head: Head,
    x,
    y,
    w: torch.Tensor,
    *,
    neg: str = "exact",
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Directional derivatives (dPos_n, dNeg_n) along w for every row, in row order.

    Rows not in the head's partition (removed pairs) get NaN. Multiply by 1/N for influence.
    """
    n = head.partition.n
    d_pos = np.full(n, np.nan)
    d_neg = np.full(n, np.nan)
    wm, w_tau = head.unflatten(w.to(head.dtype))
    t = head.logit_scale
    mw = torch.cat([head.m, wm], dim=1)  # one matmul gives both X M and X W
    dt = head.m.shape[1]
    chunk = max(1, SCORE_CHUNK_ROWS // head.partition.width)
    for ch in iter_chunks(
        x, y, head.partition, dtype=head.dtype, device=head.m.device, batches_per_chunk=chunk
    ):
        yt = ch.y.transpose(-1, -2)
        u = ch.x @ mw
        s = t * u[..., :dt] @ yt
        ds = t * u[..., dt:] @ yt
        if w_tau is not None:
            ds = ds + w_tau * s
        d = removal_directional(s, ds, ch.mask, neg)
        m = ch.mask.cpu().numpy()
        d_pos[ch.rows[m]] = d.pos.cpu().numpy()[m]
        d_neg[ch.rows[m]] = d.neg.cpu().numpy()[m]
        if progress is not None:
            progress(len(ch.batch_ids))
    return d_pos, d_neg


def pair_gradients(
    head: Head, x, y, rows: np.ndarray, *, neg: str = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_theta Pos_n and grad_theta Neg_n for the given row positions: two (K, P) tensors.

    Costs B^2 d + B d^2 per pair: meant for candidate subsets, not the whole dataset.
    """
    rows = np.asarray(rows, dtype=np.int64)
    batch_of = head.partition.batch_of()
    if (batch_of[rows] < 0).any():
        raise ValueError("some rows are not in the head's partition (removed pairs)")
    t = head.logit_scale
    out_pos = torch.zeros(len(rows), head.num_params, dtype=head.dtype, device=head.m.device)
    out_neg = torch.zeros_like(out_pos)
    for b in np.unique(batch_of[rows]):
        sel = np.nonzero(batch_of[rows] == b)[0]
        ch = next(
            iter_chunks(
                x,
                y,
                head.partition,
                dtype=head.dtype,
                device=head.m.device,
                batch_ids=np.array([b]),
            )
        )
        members = torch.as_tensor([int(np.nonzero(ch.rows[0] == r)[0][0]) for r in rows[sel]])
        s = t * (ch.x @ head.m) @ ch.y.transpose(-1, -2)
        st = batch_stats(s, ch.mask)
        g_pos, g_neg = removal_grad_logits(st, removal_weights(s, st, neg), members)
        xb, yb = ch.x[0], ch.y[0]
        for g, out in ((g_pos, out_pos), (g_neg, out_neg)):
            gm = t * torch.einsum("bi,kbj->kij", xb, g @ yb)
            out[torch.as_tensor(sel)] = head.flatten(gm, (g * s[0]).sum((1, 2)))
    return out_pos, out_neg


def negative_breakdown(
    head: Head, x, y, w: torch.Tensor, row: int, *, neg: str = "exact"
) -> pd.DataFrame:
    """How pair ``row``'s negative influence splits over the other members of its batch.

    Member k's share is A_kn (dS_kn - r_k) + Bq_nk (dS_nk - c_k), divided by N: the part of
    influence_neg that comes from ``row`` serving as a negative for k's image and k's text.
    The shares sum to the pair's influence_neg.
    """
    batch_of = head.partition.batch_of()
    b = int(batch_of[row])
    if b < 0:
        raise ValueError(f"row {row} is not in the head's partition")
    ch = next(
        iter_chunks(
            x, y, head.partition, dtype=head.dtype, device=head.m.device, batch_ids=np.array([b])
        )
    )
    n = int(np.nonzero(ch.rows[0] == row)[0][0])
    wm, w_tau = head.unflatten(w.to(head.dtype))
    t = head.logit_scale
    s = t * (ch.x @ head.m) @ ch.y.transpose(-1, -2)
    ds = t * (ch.x @ wm) @ ch.y.transpose(-1, -2)
    if w_tau is not None:
        ds = ds + w_tau * s
    d = removal_directional(s, ds, ch.mask, neg, at=([0], [n]))  # the summands of dNeg_n
    as_row = d.a[0] * (ds[0, :, n] - d.r[0])  # n as a negative text in row k
    as_col = d.bq[0] * (ds[0, n, :] - d.c[0])  # n as a negative image in column k
    valid = ch.mask[0].cpu().numpy() & (np.arange(len(ch.rows[0])) != n)
    return pd.DataFrame(
        {
            "row": ch.rows[0][valid],
            "as_negative_text": (as_row.cpu().numpy() / head.n_norm)[valid],
            "as_negative_image": (as_col.cpu().numpy() / head.n_norm)[valid],
        }
    ).assign(share=lambda d: d.as_negative_text + d.as_negative_image)
