"""Symmetric InfoNCE on a stack of batches of logits, and the ECIF removal terms.

Everything here acts on logits ``S`` shaped ``(c, B, B)`` (c batches of up to B members, row
i = image i, column j = text j) with a member mask ``(c, B)``; padded or removed members are
masked out. The head model's derivatives follow from these by the chain rule
``dS = t X dM Y^T`` (see ``ecif.engine.head``). Formulas: docs/math.md sections 2, 3 and 5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_FORMS = ("exact", "first_order")


@dataclass
class BatchStats:
    """Row and column softmaxes of masked logits, computed once and shared by every term."""

    log_p: torch.Tensor  # row log-softmax (image -> text); -inf at masked columns
    log_q: torch.Tensor  # column log-softmax (text -> image); -inf at masked rows
    p: torch.Tensor  # exp(log_p), zero on masked rows and columns
    q: torch.Tensor  # exp(log_q), zero on masked rows and columns
    mask: torch.Tensor  # (c, B) bool, valid members

    @property
    def eye(self) -> torch.Tensor:
        b = self.mask.shape[-1]
        eye = torch.eye(b, dtype=torch.bool, device=self.mask.device)
        return eye & self.mask[:, :, None]


def batch_stats(s: torch.Tensor, mask: torch.Tensor) -> BatchStats:
    """Masked row/column softmaxes. Every batch must have at least one valid member."""
    row_ok = mask[:, :, None]
    col_ok = mask[:, None, :]
    log_p = torch.log_softmax(s.masked_fill(~col_ok, float("-inf")), dim=-1)
    log_q = torch.log_softmax(s.masked_fill(~row_ok, float("-inf")), dim=-2)
    valid = row_ok & col_ok
    p = torch.where(valid, log_p.exp(), torch.zeros((), dtype=s.dtype, device=s.device))
    q = torch.where(valid, log_q.exp(), torch.zeros((), dtype=s.dtype, device=s.device))
    return BatchStats(log_p=log_p, log_q=log_q, p=p, q=q, mask=mask)


def _diag(x: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(x, dim1=-2, dim2=-1)


def pair_losses(st: BatchStats) -> torch.Tensor:
    """Per-member symmetric InfoNCE, -log p_ii - log q_ii, zero for masked members: (c, B)."""
    zero = torch.zeros((), dtype=st.p.dtype, device=st.p.device)
    return torch.where(st.mask, -_diag(st.log_p) - _diag(st.log_q), zero)


def loss_grad_logits(st: BatchStats) -> torch.Tensor:
    """dL_b/dS for L_b = sum_i [-log p_ii - log q_ii]: G = P + Q - 2I (masked)."""
    return st.p + st.q - 2.0 * st.eye.to(st.p.dtype)


def loss_hessian_logits(st: BatchStats, ds: torch.Tensor) -> torch.Tensor:
    """d2L_b/dS2 applied to ds: softmax Hessians row by row and column by column, never formed.

    ``ds`` may carry extra leading dimensions in front of the batch stack.
    """
    p, q = st.p, st.q
    row = p * ds - p * (p * ds).sum(-1, keepdim=True)
    col = q * ds - q * (q * ds).sum(-2, keepdim=True)
    return row + col


def _log1m_softmax(
    log_sm: torch.Tensor, s: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log(1 - softmax) and softmax/(1 - softmax) without cancellation.

    1 - p_kn = (Z - e_kn) / Z with e = exp(s - max): for the maximal entry Z - e is the sum
    of the other entries, summed directly, so a nearly certain p never rounds 1 - p to 0.
    Masked entries (s = -inf) give log 0 = 0 and ratio 0.
    """
    finite = torch.isfinite(log_sm)
    s_m = torch.where(finite, s, torch.full_like(s, float("-inf")))
    m, am = s_m.max(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(finite, (s_m - m).exp(), torch.zeros_like(s))
    is_max = torch.zeros_like(finite).scatter_(dim, am, True) & finite
    z = e.sum(dim=dim, keepdim=True)
    z_wo_max = e.masked_fill(is_max, 0.0).sum(dim=dim, keepdim=True)
    denom = torch.where(is_max, z_wo_max.expand_as(e), z - e)
    safe = denom > 0
    log1m = torch.where(safe, denom.clamp_min(1e-300).log() - z.log(), torch.zeros_like(s))
    ratio = torch.where(safe & finite, e / denom.clamp_min(1e-300), torch.zeros_like(s))
    return log1m, ratio


@dataclass
class RemovalWeights:
    """Per-entry weights of the negative term: A_kn (rows) and Bq_nk (columns), diag zeroed."""

    a: torch.Tensor  # (c, B, B): weight of entry (k, n) in row k for pair n
    bq: torch.Tensor  # (c, B, B): weight of entry (n, k) in column k for pair n
    neg_values: torch.Tensor  # (c, B): Neg_n itself


def removal_weights(s: torch.Tensor, st: BatchStats, neg: str = "exact") -> RemovalWeights:
    """Weights of Neg_n's derivative and its value, in the exact or first-order form (the
    weights again, in the form per-pair gradients need; ``removal_directional`` forms its own
    in the scoring pass's fewer passes)."""
    if neg not in NEG_FORMS:
        raise ValueError(f"neg must be one of {NEG_FORMS}; got {neg!r}")
    off = ~torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    valid = st.mask[:, :, None] & st.mask[:, None, :] & off
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if neg == "exact":
        log1m_p, a = _log1m_softmax(st.log_p, s, dim=-1)
        log1m_q, bq = _log1m_softmax(st.log_q, s, dim=-2)
        a = torch.where(valid, a, zero)
        bq = torch.where(valid, bq, zero)
        # Neg_n = sum_{k!=n} -log(1 - p_kn) - log(1 - q_nk)
        neg_val = -torch.where(valid, log1m_p, zero).sum(-2) - torch.where(
            valid, log1m_q, zero
        ).sum(-1)
    else:
        a = torch.where(valid, st.p, zero)
        bq = torch.where(valid, st.q, zero)
        neg_val = a.sum(-2) + bq.sum(-1)
    return RemovalWeights(a=a, bq=bq, neg_values=torch.where(st.mask, neg_val, zero))


def removal_grad_logits(
    st: BatchStats, w: RemovalWeights, members: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dPos_n/dS and dNeg_n/dS for selected members of ONE batch.

    ``members``: 1-D positions n inside the batch. Returns two (len(members), B, B) tensors.
    Used for per-pair gradients (relative influence, self-influence), never for full scoring.
    """
    p, q, a, bq = st.p[0], st.q[0], w.a[0], w.bq[0]
    b = p.shape[-1]
    eye = torch.eye(b, dtype=p.dtype, device=p.device)
    e_n = eye[members]  # (K, B)
    # Pos: row n gets p_n. - e_n ; column n gets q_.n - e_n
    g_pos = e_n[:, :, None] * (p[members] - e_n)[:, None, :]
    g_pos = g_pos + (q[:, members].T - e_n)[:, :, None] * e_n[:, None, :]
    # Neg rows: for k != n, row k gets A_kn (e_n - p_k.)
    a_n = a[:, members].T  # (K, B): A_kn over k
    g_neg = a_n[:, :, None] * (e_n[:, None, :] - p[None, :, :])
    # Neg columns: for k != n, column k gets Bq_nk (e_n - q_.k)
    b_n = bq[members]  # (K, B): Bq_nk over k
    g_neg = g_neg + b_n[:, None, :] * (e_n[:, :, None] - q[None, :, :])
    return g_pos, g_neg


def _line(
    s_m: torch.Tensor, ds: torch.Tensor, neg: str, at: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One side of the batches, softmax along the last dim of masked logits ``s_m`` (-inf at
    masked columns): r = E_p[ds] (..., c, B, 1) and the removal weights A_kn = p_kn / (1 - p_kn)
    (exact) or p_kn (first order), zero at k = n. All of them (c, B, B), A[k, n], or with
    ``at`` = (ci, ni) only member ni's column of batch ci, (K, B) over k. 1 - p is (z - e) / z
    with e = exp(s - max): at a row's maximum z - e is summed directly (no cancellation)."""
    mx, am = s_m.max(dim=-1, keepdim=True)
    e = (s_m - mx).exp_()
    z = e.sum(-1, keepdim=True)
    r = (e * ds).sum(-1, keepdim=True) / z
    tiny = torch.finfo(s_m.dtype).tiny
    if at is None:
        if neg == "exact":
            z_wo = e.scatter(-1, am, 0.0).sum(-1, keepdim=True)
            d = (z - e).scatter_(-1, am, z_wo)
            a = e.div_(d.clamp_min_(tiny))
        else:
            a = e.div_(z)
        a.diagonal(dim1=-2, dim2=-1).zero_()
        return r, a
    ci, ni = at
    k = torch.arange(len(ci), device=s_m.device)
    e_n, z_n = e[ci, :, ni], z[ci, :, 0]  # (K, B): row k's entry in column n, its partition
    if neg == "exact":
        at_max = am[ci, :, 0] == ni[:, None]
        at_max[k, ni] = False  # k = n carries no weight
        denom = z_n - e_n
        if bool(at_max.any()):
            denom = torch.where(at_max, e.scatter(-1, am, 0.0).sum(-1)[ci], denom)
        a = e_n / denom.clamp_min(tiny)
    else:
        a = e_n / z_n
    a[k, ni] = 0.0
    return r, a


@dataclass
class RemovalDirectional:
    """The removal term's directional derivative along a logit perturbation ``ds`` and its
    pieces. Full form: (c, B) per member, weights (c, B, B); with ``at`` = (ci, ni): (K,) per
    selected member, weights (K, B) over k. Leading dimensions of ``ds`` carry through."""

    pos: torch.Tensor  # dPos_n
    neg: torch.Tensor  # dNeg_n
    r: torch.Tensor  # (..., c, B): r_k = E_{p_k}[dS_k.], the rows' expectations
    c: torch.Tensor  # (..., c, B): c_k = E_{q_k}[dS_.k], the columns' expectations
    a: torch.Tensor  # a[k, n] = A_kn, row k's weight on pair n
    bq: torch.Tensor  # bq[k, n] = Bq_nk, column k's weight on pair n

    @property
    def total(self) -> torch.Tensor:
        """dR_n = dPos_n + dNeg_n."""
        return self.pos + self.neg


def removal_directional(
    s: torch.Tensor,
    ds: torch.Tensor,
    mask: torch.Tensor,
    neg: str = "exact",
    *,
    at: tuple | None = None,
) -> RemovalDirectional:
    """dPos_n and dNeg_n along ``ds`` straight from the logits ``s`` (c, B, B): the library's one
    implementation of the removal term's directional derivative (docs/math.md section 5),

      dPos_n = -2 dS_nn + r_n + c_n,  dNeg_n = sum_k A_kn (dS_kn - r_k) + sum_k Bq_nk (dS_nk - c_k)

    with r_k = E_{p_k}[dS_k.], c_k = E_{q_k}[dS_.k]. The row and column sides are one helper on
    s and s^T, with no full-size masks unless the stack has missing members. In the full form
    ``ds`` may carry leading dimensions (K directions: the softmaxes computed once). ``at`` =
    (ci, ni), member ni of batch ci for each of K members: only those members' removal weights
    are formed (the B x B work is then the expectations r and c).
    """
    if neg not in NEG_FORMS:
        raise ValueError(f"neg must be one of {NEG_FORMS}; got {neg!r}")
    full = bool(mask.all())
    s_t, ds_t = s.transpose(-1, -2), ds.transpose(-1, -2)
    if full:
        s_r, s_c = s, s_t
    else:
        s_r = s.masked_fill(~mask[:, None, :], float("-inf"))
        s_c = s_t.masked_fill(~mask[:, None, :], float("-inf"))
    if at is not None:
        at = tuple(torch.as_tensor(i, device=s.device) for i in at)
    r, a = _line(s_r, ds, neg, at)  # rows: a[k, n] = A_kn
    c, b = _line(s_c.contiguous(), ds_t.contiguous(), neg, at)  # columns: b[k, n] = Bq_nk
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if at is None:
        if not full:
            a.mul_(mask[:, :, None])
            b.mul_(mask[:, :, None])
        d_neg = (a * (ds - r)).sum(-2) + (b * (ds_t - c)).sum(-2)
        d_pos = -2.0 * ds.diagonal(dim1=-2, dim2=-1) + r[..., 0] + c[..., 0]
        d_pos, d_neg = torch.where(mask, d_pos, zero), torch.where(mask, d_neg, zero)
        return RemovalDirectional(d_pos, d_neg, r[..., 0], c[..., 0], a, b)
    ci, ni = at
    k = torch.arange(len(ci), device=s.device)
    keep = mask[ci].to(s.dtype)
    a, b = a * keep, b * keep
    r_k, c_k = r[ci, :, 0], c[ci, :, 0]  # (K, B)
    d_neg = (a * (ds[ci, :, ni] - r_k)).sum(-1) + (b * (ds_t[ci, :, ni] - c_k)).sum(-1)
    d_pos = -2.0 * ds[ci, ni, ni] + r_k[k, ni] + c_k[k, ni]
    return RemovalDirectional(d_pos, d_neg, r[..., 0], c[..., 0], a, b)
