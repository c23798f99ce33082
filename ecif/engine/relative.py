"""Relative influence for trace-back at scale (docs/math.md section 8).

rIS_n = g^T d_n / ||d_n|| with d_n = H^-1 grad R_n. The denominator does not depend on the
query, so ``pair_norms`` computes it once for every pair (exactly from the low-rank structure
of grad R_n, or as a Johnson-Lindenstrauss estimate from K probe directions when exact is too
costly), and a query pays only its numerator: one pass over the batches its candidates sit
in, with W = H^-1 g cut to its numerical rank (EK-FAC's W is close to rank 2).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ecif.engine.batches import iter_chunks
from ecif.engine.contrastive import removal_directional
from ecif.engine.head import Head


# -- the removal term's gradient, contracted without forming dR_n/dS ----------------------
def removal_terms(s: torch.Tensor, ds: torch.Tensor, mask: torch.Tensor, neg: str) -> dict:
    """Softmaxes, removal weights A (rows) and Bq (columns), and dR_n along ds, per batch.

    dR_n/dS = e_n (p_n - e_n + Bq_n.)^T + (q_.n - e_n + A_.n) e_n^T - diag(A_.n) P - Q diag(Bq_n.)
    (docs/math.md sections 3 and 5), which is what ``removal_grad_m`` contracts.
    """
    d = removal_directional(s, ds, mask, neg)
    if bool(mask.all()):
        s_r, s_c = s, s.transpose(-1, -2)
    else:
        s_r = s.masked_fill(~mask[:, None, :], float("-inf"))
        s_c = s.transpose(-1, -2).masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.softmax(s_r, -1) * mask[:, :, None]  # rows: image -> text
    qt = torch.softmax(s_c, -1) * mask[:, :, None]  # qt[j, i] = q_ij: text -> image
    return {"p": p, "qt": qt, "a": d.a, "b": d.bq, "dot": d.total}


def removal_grad_m(terms: dict, xs: torch.Tensor, ys: torch.Tensor, ci, ni) -> torch.Tensor:
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


def removal_grad_tau(terms: dict, s: torch.Tensor, ci, ni) -> torch.Tensor:
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


# -- W = H^-1 g at its numerical rank ------------------------------------------------------
def low_rank(wm: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(L, R) with ||W - L R^T||_F <= tol ||W||_F, or None when that needs more than a quarter
    of the full rank (then the full W is cheaper). A randomized range finder with doubling
    rank: a few thin matmuls instead of a full SVD."""
    if tol <= 0:
        return None
    d = min(wm.shape)
    gen = torch.Generator(device=wm.device).manual_seed(0)
    total = wm.square().sum()
    k = 8
    while k <= d // 4:
        omega = torch.randn(wm.shape[1], k, generator=gen, dtype=wm.dtype, device=wm.device)
        q = torch.linalg.qr(wm @ omega)[0]
        qw = q.T @ wm  # W ~ Q (Q^T W); the residual's energy is ||W||^2 - ||Q^T W||^2
        if total - qw.square().sum() <= tol * tol * total:
            return q, qw.T
        k *= 2
    return None


def _member_slots(n: int, rows: np.ndarray, batch_of: np.ndarray) -> np.ndarray:
    if len(rows) and (batch_of[rows] < 0).any():
        raise ValueError("some rows are not in the head's partition (removed pairs)")
    slot = np.full(n, -1, dtype=np.int64)
    slot[rows] = np.arange(len(rows))
    return slot


def candidate_pass(
    head: Head,
    x,
    y,
    w: torch.Tensor | None,
    rows: np.ndarray,
    *,
    neg: str = "exact",
    inverse=None,
    rank_tol: float = 0.0,
    batches_per_step: int = 8,
) -> tuple[np.ndarray, np.ndarray | None]:
    """g^T d_n (the directional derivative of R_n along w = H^-1 g) for ``rows``, and ||d_n||
    when ``inverse`` is given (EK-FAC's closed form, else a per-pair solve).

    Only the batches the rows sit in are read. ``rank_tol`` > 0 replaces W by its truncated
    SVD (relative Frobenius error <= rank_tol) when that is cheaper.
    """
    rows = np.asarray(rows, dtype=np.int64)
    batch_of = head.partition.batch_of()
    slot = _member_slots(head.partition.n, rows, batch_of)
    if w is None:  # norms only
        w = torch.zeros(head.num_params, dtype=head.dtype, device=head.m.device)
    wm, w_tau = head.unflatten(w.to(head.dtype))
    if not bool(wm.any()):
        wm = wm[:, :0]
    ek = None
    if inverse is not None and inverse.method != "exact" and not head.learn_scale:
        ek = inverse.ekfac
    lr = low_rank(wm, rank_tol) if inverse is None and wm.numel() else None
    mats = [head.m, wm if lr is None else lr[0]] + ([ek.q1] if ek is not None else [])
    mw = torch.cat(mats, dim=1)
    dt, kw = head.m.shape[1], mats[1].shape[1]
    t = head.logit_scale
    dot = np.zeros(len(rows))
    norm = np.zeros(len(rows)) if inverse is not None else None
    for ch in iter_chunks(
        x,
        y,
        head.partition,
        dtype=head.dtype,
        device=head.m.device,
        batches_per_chunk=batches_per_step,
        batch_ids=np.unique(batch_of[rows]),
    ):
        u = ch.x @ mw  # X M, X W or X L (and X Q1) in one matmul
        yt = ch.y.transpose(-1, -2)
        s = t * u[..., :dt] @ yt
        if kw == 0:
            ds = torch.zeros_like(s)
        elif lr is None:
            ds = t * u[..., dt : dt + kw] @ yt
        else:
            ds = t * u[..., dt : dt + kw] @ (ch.y @ lr[1]).transpose(-1, -2)
        if w_tau is not None:
            ds = ds + w_tau * s
        mask = ch.mask.cpu().numpy()
        at = slot[np.where(mask, ch.rows, 0)]
        ci, ni = np.nonzero((at >= 0) & mask)
        out = at[ci, ni]
        if inverse is None:
            d = removal_directional(s, ds, ch.mask, neg, at=(ci, ni))
            dot[out] = d.total.cpu().numpy()
            continue
        terms = removal_terms(s, ds, ch.mask, neg)
        dot[out] = terms["dot"][ci, ni].cpu().numpy()
        xs, ys = (u[..., dt + kw :], ch.y @ ek.q2) if ek is not None else (ch.x, ch.y)
        gm = t * removal_grad_m(terms, xs, ys, ci, ni)
        if ek is not None:
            norm[out] = (gm / ek.diag).flatten(1).norm(dim=1).cpu().numpy()
        else:
            grads = head.flatten(gm, removal_grad_tau(terms, s, ci, ni))
            norm[out] = inverse.solve(grads).norm(dim=1).cpu().numpy()
    return dot, norm


def probe_norms(
    head: Head,
    x,
    y,
    inverse,
    *,
    probes: int = 64,
    seed: int = 0,
    neg: str = "exact",
    progress: Callable | None = None,
) -> np.ndarray:
    """||d_n|| for every pair, estimated from K Gaussian probes z_k: ||d_n||^2 = E (z^T d_n)^2
    and z^T d_n = grad R_n^T (H^-1 z): K directional derivatives per batch, no per-pair
    gradient. Relative standard error of ||d_n|| is about 1/sqrt(2K)."""
    if probes < 1:
        raise ValueError("probes must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(probes, head.num_params, generator=gen, dtype=torch.float64)
    v = inverse.solve(z.to(device=head.m.device, dtype=head.dtype))
    vm, v_tau = head.unflatten(v)  # (K, di, dt)
    di, dt = head.m.shape
    mv = torch.cat([head.m[None], vm], dim=0).permute(1, 0, 2).reshape(di, -1)
    t = head.logit_scale
    sq = np.zeros(head.partition.n)
    for ch in iter_chunks(
        x, y, head.partition, dtype=head.dtype, device=head.m.device, batches_per_chunk=1
    ):
        u = (ch.x @ mv).reshape(*ch.x.shape[:2], probes + 1, dt).movedim(2, 0)
        yt = ch.y.transpose(-1, -2)
        st = t * u @ yt  # (K + 1, c, B, B)
        s, ds = st[0], st[1:]
        if v_tau is not None:
            ds = ds + v_tau[:, None, None, None] * s
        dots = removal_directional(s, ds, ch.mask, neg).total  # (K, c, B)
        mask = ch.mask.cpu().numpy()
        sq[ch.rows[mask]] = dots.square().mean(0).cpu().numpy()[mask]
        if progress is not None:
            progress(len(ch.batch_ids))
    return np.sqrt(sq)


def exact_norms(
    head: Head,
    x,
    y,
    inverse,
    *,
    neg: str = "exact",
    progress: Callable | None = None,
    batches_per_step: int = 4,
) -> np.ndarray:
    """||d_n|| for every pair from its exact gradient (about 4 B d^2 flops a pair)."""
    n = head.partition.n
    out = np.zeros(n)
    nb = head.partition.num_batches
    rows_of = head.partition.index
    for start in range(0, nb, 64):
        sel = rows_of[start : start + 64].reshape(-1)
        sel = sel[sel >= 0]
        _, norm = candidate_pass(
            head, x, y, None, sel, neg=neg, inverse=inverse, batches_per_step=batches_per_step
        )
        out[sel] = norm
        if progress is not None:
            progress(min(64, nb - start))
    return out
