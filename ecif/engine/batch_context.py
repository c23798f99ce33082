"""Per-pair batch context, so a trace query never recomputes a candidate's whole batch.

The numerator of relative influence, dR_n along w = H^-1 g (ecif-math.md sections 3-6), is

  dR_n = -2 dS_nn + r_n + c_n + sum_k A_kn (dS_kn - r_k) + sum_k Bq_nk (dS_nk - c_k)

with r_k = E_{p_k}[dS_k.] = t x_k^T W ybar_k (+ w_tau E_{p_k}[S_k.]) and c_k likewise. Given,
for every pair k, its row's and column's log-partition (with and without the maximum, for a
stable 1 - p), the soft partners ybar_k = sum_j p_kj y_j and xbar_k = sum_i q_ik x_i, and
E_p[S], a candidate needs only its own row and column of S and dS (O(B d + d^2)) and r_k, c_k
for the batch members that weigh on it. The weights A_kn are mostly tiny, so r_k is taken
for the ``top`` heaviest members only and the rest is bounded: |dropped| <= sum of their
weights x max |r_k|, with |r_k| <= t ||W||_2 max||x|| max||y|| (+ |w_tau| max|E S|).
``top = batch size`` is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ecif.engine.batches import _take, iter_chunks
from ecif.engine.head import Head
from ecif.engine.influence import _unflat

SCALARS = ("lse_r", "lse_c", "lse_wo_r", "lse_wo_c", "es_r", "es_c", "am_r", "am_c")


def new_context(n: int, di: int, dt: int, *, vector_dtype=np.float32, alloc=np.zeros) -> dict:
    """Empty arrays for n pairs (``alloc`` can make them memory-mapped files)."""
    out = {"ybar": alloc((n, dt), dtype=vector_dtype), "xbar": alloc((n, di), dtype=vector_dtype)}
    for k in SCALARS:
        out[k] = alloc((n,), dtype=np.int64 if k.startswith("am") else np.float64)
    return out


def _side(s: torch.Tensor, mask: torch.Tensor, dim: int):
    s_m = s.masked_fill(~(mask[:, None, :] if dim == -1 else mask[:, :, None]), float("-inf"))
    mx, am = s_m.max(dim=dim, keepdim=True)
    e = (s_m - mx).exp()
    lse = e.sum(dim).log() + mx.squeeze(dim)
    lse_wo = e.scatter(dim, am, 0.0).sum(dim).log() + mx.squeeze(dim)
    p = e / e.sum(dim, keepdim=True)
    es = (p * s.masked_fill(~torch.isfinite(s_m), 0.0)).sum(dim)
    return p, lse, lse_wo, es, am.squeeze(dim)


def fill_context(
    head: Head, x, y, ctx: dict, *, progress: Callable | None = None, batches_per_step: int = 8
) -> dict:
    """One pass over the partition (about a scoring pass's cost) filling ``ctx`` in place."""
    t = head.logit_scale
    for ch in iter_chunks(
        x,
        y,
        head.partition,
        dtype=head.dtype,
        device=head.m.device,
        batches_per_chunk=batches_per_step,
    ):
        s = t * (ch.x @ head.m) @ ch.y.transpose(-1, -2)
        mask = ch.mask.cpu().numpy()
        rows = ch.rows[mask]
        members = torch.as_tensor(np.where(ch.rows >= 0, ch.rows, -1))
        for dim, vec, other, key in ((-1, "ybar", ch.y, "r"), (-2, "xbar", ch.x, "c")):
            p, lse, lse_wo, es, am = _side(s, ch.mask, dim)
            soft = p @ other if dim == -1 else p.transpose(-1, -2) @ other
            ctx[vec][rows] = soft.cpu().numpy()[mask]
            ctx[f"lse_{key}"][rows] = lse.cpu().numpy()[mask]
            ctx[f"lse_wo_{key}"][rows] = lse_wo.cpu().numpy()[mask]
            ctx[f"es_{key}"][rows] = es.cpu().numpy()[mask]
            ctx[f"am_{key}"][rows] = torch.gather(members, 1, am.cpu()).numpy()[mask]
        nx, ny = (float(v.norm(dim=-1).max()) for v in (ch.x, ch.y))
        ctx["norm_max"] = np.maximum(ctx.get("norm_max", np.zeros(2)), [nx, ny])
        if progress is not None:
            progress(len(ch.batch_ids))
    return ctx


def _weights(s_line, lse, lse_wo, am, rows_n, valid, exact: bool):
    """A_kn (or Bq_nk) for one candidate per line: p/(1-p) with 1-p stable at a maximum."""
    z = s_line - lse
    p = z.exp()
    if exact:
        one_minus = torch.where(am == rows_n[:, None], (lse_wo - lse).exp(), -torch.expm1(z))
        a = p / one_minus.clamp_min(torch.finfo(p.dtype).tiny)
    else:
        a = p
    return a * valid


def context_dots(
    head: Head,
    x,
    y,
    ctx: dict,
    w: torch.Tensor,
    rows: np.ndarray,
    *,
    top: int = 32,
    neg: str = "exact",
    chunk: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """dR_n along w for ``rows`` from the stored context: (dots, bounds on what ``top`` drops)."""
    rows = np.asarray(rows, dtype=np.int64)
    part = head.partition
    batch_of, slot = part.batch_of(), part.index
    if len(rows) and (batch_of[rows] < 0).any():
        raise ValueError("some rows are not in the head's partition (removed pairs)")
    dev, dt_ = head.m.device, head.dtype
    wm, w_tau = _unflat(head, w.to(dt_))
    tau = 0.0 if w_tau is None else float(w_tau)
    t, m = head.logit_scale, head.m
    w_norm = float(wm.norm())  # Frobenius >= spectral: a cheap valid bound
    dots, bounds = np.zeros(len(rows)), np.zeros(len(rows))
    norm_max = float(np.prod(ctx.get("norm_max", (np.inf, np.inf))))

    def take(name, idx):
        return _take(ctx[name], idx, dt_, dev)

    for start in range(0, len(rows), chunk):
        rn = rows[start : start + chunk]
        members = slot[batch_of[rn]]  # (K, B) global rows, -1 where empty
        valid = torch.as_tensor(members >= 0, device=dev)
        safe = np.where(members >= 0, members, 0)
        xb = _take(x, safe.reshape(-1), dt_, dev).reshape(*safe.shape, -1) * valid[..., None]
        yb = _take(y, safe.reshape(-1), dt_, dev).reshape(*safe.shape, -1) * valid[..., None]
        xn, yn = _take(x, rn, dt_, dev), _take(y, rn, dt_, dev)
        rn_t = torch.as_tensor(rn, device=dev)
        me = torch.as_tensor(members, device=dev) == rn_t[:, None]  # where k = n
        keep = valid & ~me
        # the candidate's column (rows k) and row (columns k) of S and dS
        s_col = t * torch.einsum("kbi,ki->kb", xb, yn @ m.T)
        s_row = t * torch.einsum("kbj,kj->kb", yb, xn @ m)
        ds_col = t * torch.einsum("kbi,ki->kb", xb, yn @ wm.T) + tau * s_col
        ds_row = t * torch.einsum("kbj,kj->kb", yb, xn @ wm) + tau * s_row
        sc = {k: take(k, safe.reshape(-1)).reshape(safe.shape) for k in SCALARS[:6]}
        am_r = torch.as_tensor(ctx["am_r"][safe], device=dev)
        am_c = torch.as_tensor(ctx["am_c"][safe], device=dev)
        exact = neg == "exact"
        a = _weights(s_col, sc["lse_r"], sc["lse_wo_r"], am_r, rn_t, keep, exact)
        b = _weights(s_row, sc["lse_c"], sc["lse_wo_c"], am_c, rn_t, keep, exact)
        # the candidate's own r_n and c_n, exactly
        ybar_n, xbar_n = take("ybar", rn), take("xbar", rn)
        es_rn, es_cn = take("es_r", rn), take("es_c", rn)
        r_n = t * ((xn @ wm) * ybar_n).sum(-1) + tau * es_rn
        c_n = t * ((xbar_n @ wm) * yn).sum(-1) + tau * es_cn
        ds_nn = t * ((xn @ wm) * yn).sum(-1) + tau * t * ((xn @ m) * yn).sum(-1)
        dot = -2.0 * ds_nn + r_n + c_n + (a * ds_col).sum(-1) + (b * ds_row).sum(-1)
        bound = torch.zeros(len(rn), dtype=dt_, device=dev)
        for wt, partner, lhs, es_key, left in (
            (a, "ybar", xb, "es_r", True),
            (b, "xbar", yb, "es_c", False),
        ):
            k_top = min(top, wt.shape[1])
            wv, at = wt.topk(k_top, dim=1)  # the heaviest members
            sel = np.take_along_axis(safe, at.cpu().numpy(), 1)
            other = take(partner, sel.reshape(-1)).reshape(*sel.shape, -1)
            own = torch.gather(lhs, 1, at[..., None].expand(-1, -1, lhs.shape[-1]))
            if left:  # r_k = t x_k^T W ybar_k
                rk = t * ((own @ wm) * other).sum(-1)
            else:  # c_k = t xbar_k^T W y_k
                rk = t * ((other @ wm) * own).sum(-1)
            rk = rk + tau * take(es_key, sel.reshape(-1)).reshape(sel.shape)
            dot = dot - (wv * rk).sum(-1)
            if k_top == wt.shape[1]:  # every member taken: nothing dropped
                continue
            rest = wt.sum(-1) - wv.sum(-1)
            es_max = sc[es_key].abs().amax(-1)
            scale = norm_max  # max ||x_k|| max ||y_j|| >= ||x_k|| ||ybar_k||
            bound = bound + rest.clamp_min(0) * (t * w_norm * scale + abs(tau) * es_max)
        dots[start : start + len(rn)] = dot.cpu().numpy()
        bounds[start : start + len(rn)] = bound.cpu().numpy()
    return dots, bounds
