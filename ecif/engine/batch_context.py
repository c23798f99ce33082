"""Per-pair batch context, so a trace query never recomputes a candidate's whole batch.

The numerator of relative influence, dR_n along w = H^-1 g (docs/math.md sections 3, 5, 8, 9), is

  dR_n = -2 dS_nn + r_n + c_n + sum_k A_kn (dS_kn - r_k) + sum_k Bq_nk (dS_nk - c_k)

with r_k = E_{p_k}[dS_k.] = t x_k^T W ybar_k (+ w_tau E_{p_k}[S_k.]) and c_k likewise. The
weights A_kn = p_kn / (1 - p_kn) (first order: p_kn) depend on the head only, not on the query,
so one pass at index time stores, for every pair n and each side, its ``top`` heaviest batch
members k with log p_kn and a stable log(1 - p_kn), the summed weight of the members not kept,
the soft partners ybar_k = sum_j p_kj y_j and xbar_k = sum_i q_ik x_i, and E_p[S]. A query then
reads, per candidate, its own row and column terms and those ``top`` members (O(top d^2), not
the whole batch), and bounds the rest: |dS_kn - r_k| <= t ||W|| (||x_k|| ||y_n|| +
||x_k|| ||ybar_k||) + |w_tau| (|S_kn| + |E S|), by the stored maxima of ||x||, ||y||, |E S|.
``top >= batch size - 1`` is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ecif.engine.batches import iter_chunks, take_rows
from ecif.engine.head import Head

SCALARS = ("es_r", "es_c")
SIDES = ("r", "c")  # r: the rows k weighing on candidate n's column; c: the columns on its row
DEFAULT_TOP = 32


def new_context(
    n: int, di: int, dt: int, *, top: int = DEFAULT_TOP, vector_dtype=np.float32, alloc=np.zeros
) -> dict:
    """Empty arrays for n pairs keeping ``top`` members per side (``alloc`` can memory-map).

    Member log-weights are float32 unless the vectors are float64 (then exact to rounding)."""
    wdt = np.float64 if np.dtype(vector_dtype) == np.float64 else np.float32
    out = {"ybar": alloc((n, dt), dtype=vector_dtype), "xbar": alloc((n, di), dtype=vector_dtype)}
    for k in SCALARS:
        out[k] = alloc((n,), dtype=np.float64)
    for side in SIDES:
        out[f"top_{side}"] = alloc((n, top), dtype=np.int64)
        out[f"logp_{side}"] = alloc((n, top), dtype=wdt)
        out[f"log1mp_{side}"] = alloc((n, top), dtype=wdt)
        out[f"rest_{side}"] = alloc((n, 2), dtype=np.float64)  # dropped weight: exact, 1st order
    return out


def context_names() -> tuple[str, ...]:
    """The arrays of a context, in the order ``new_context`` allocates them."""
    per_side = tuple(f"{a}_{s}" for s in SIDES for a in ("top", "logp", "log1mp", "rest"))
    return ("ybar", "xbar", *SCALARS, *per_side)


def _side(s: torch.Tensor, mask: torch.Tensor, dim: int):
    """Softmax along ``dim`` with log p and a stable log(1 - p) (from the log-partition without
    the line's maximum where p is the maximum), and E_p[S]."""
    s_m = s.masked_fill(~(mask[:, None, :] if dim == -1 else mask[:, :, None]), float("-inf"))
    mx, am = s_m.max(dim=dim, keepdim=True)
    e = (s_m - mx).exp()
    lse = e.sum(dim, keepdim=True).log() + mx
    lse_wo = e.scatter(dim, am, 0.0).sum(dim, keepdim=True).log() + mx
    logp = s_m - lse
    at_max = torch.zeros_like(s_m, dtype=torch.bool).scatter(dim, am, True)
    with torch.no_grad():
        log1mp = torch.where(at_max, lse_wo - lse, torch.log(-torch.expm1(logp.clamp_max(0))))
    p = logp.exp()
    es = (p * s.masked_fill(~torch.isfinite(s_m), 0.0)).sum(dim)
    return p, logp, log1mp, es


def _heaviest(logp, log1mp, mask, members, top: int):
    """Per candidate (dim 1), its ``top`` heaviest other members (dim 2) and the dropped sums."""
    c, b, _ = logp.shape
    other = (
        mask[:, :, None] & mask[:, None, :] & ~torch.eye(b, dtype=torch.bool, device=mask.device)
    )
    logp = logp.masked_fill(~other, float("-inf"))
    log1mp = log1mp.masked_fill(~other, 0.0)
    w_exact = (logp - log1mp).exp().double()
    w_first = logp.exp().double()
    k = min(top, b)
    vals, at = logp.topk(k, dim=-1)
    kept = vals > float("-inf")
    idx = torch.gather(members[:, None, :].expand(c, b, b), 2, at.cpu()).to(at.device)
    idx = idx.masked_fill(~kept, -1)
    rest = torch.stack(
        [
            w.sum(-1) - torch.gather(w, 2, at).masked_fill(~kept, 0).sum(-1)
            for w in (w_exact, w_first)
        ],
        -1,
    )
    pad = top - k
    l1 = torch.gather(log1mp, 2, at).masked_fill(~kept, 0.0)
    if pad:
        vals = torch.nn.functional.pad(vals, (0, pad), value=float("-inf"))
        l1 = torch.nn.functional.pad(l1, (0, pad), value=0.0)
        idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
    return idx, vals, l1, rest.clamp_min(0)


def fill_context(
    head: Head, x, y, ctx: dict, *, progress: Callable | None = None, batches_per_step: int = 8
) -> dict:
    """One pass over the partition (about a scoring pass's cost) filling ``ctx`` in place."""
    t = head.logit_scale
    top = ctx["top_r"].shape[1]
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
            p, logp, log1mp, es = _side(s, ch.mask, dim)
            soft = p @ other if dim == -1 else p.transpose(-1, -2) @ other
            ctx[vec][rows] = soft.cpu().numpy()[mask]
            ctx[f"es_{key}"][rows] = es.cpu().numpy()[mask]
            es_seen = float(es[ch.mask].abs().max()) if len(rows) else 0.0
            ctx["es_max"] = max(float(ctx.get("es_max", 0.0)), es_seen)
            if dim == -1:  # candidate n is a column: row k's weight on it is p_kn
                logp, log1mp = logp.transpose(-1, -2), log1mp.transpose(-1, -2)
            idx, lp, l1, rest = _heaviest(logp, log1mp, ch.mask, members, top)
            for name, val in (("top", idx), ("logp", lp), ("log1mp", l1), ("rest", rest)):
                ctx[f"{name}_{key}"][rows] = val.cpu().numpy()[mask]
        nx, ny = (float(v.norm(dim=-1).max()) for v in (ch.x, ch.y))
        ctx["norm_max"] = np.maximum(ctx.get("norm_max", np.zeros(2)), [nx, ny])
        if progress is not None:
            progress(len(ch.batch_ids))
    return ctx


def _members(ctx: dict, rn: np.ndarray, side: str, k_use: int, exact: bool, dtype, dev):
    """The first ``k_use`` stored members of each candidate on one side: their weights
    (0 where none), the dropped weight (stored rest + stored members beyond ``k_use``) and
    their rows (0 where none)."""
    idx = np.asarray(ctx[f"top_{side}"][rn])
    lp = torch.as_tensor(np.asarray(ctx[f"logp_{side}"][rn]), device=dev).to(dtype)
    l1 = torch.as_tensor(np.asarray(ctx[f"log1mp_{side}"][rn]), device=dev).to(dtype)
    wt = (lp - l1).exp() if exact else lp.exp()  # exp(-inf) = 0 where no member
    rest = torch.as_tensor(np.asarray(ctx[f"rest_{side}"][rn][:, 0 if exact else 1]))
    rest = rest.to(dev, dtype) + wt[:, k_use:].sum(-1)
    idx = idx[:, :k_use]
    return wt[:, :k_use], rest.clamp_min(0), np.where(idx >= 0, idx, 0)


def context_dots(
    head: Head,
    x,
    y,
    ctx: dict,
    w: torch.Tensor,
    rows: np.ndarray,
    *,
    top: int = DEFAULT_TOP,
    neg: str = "exact",
    chunk: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """dR_n along w for ``rows`` from the stored context: (dots, bounds on what ``top`` drops)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (head.partition.batch_of()[rows] < 0).any():
        raise ValueError("some rows are not in the head's partition (removed pairs)")
    dev, dt_ = head.m.device, head.dtype
    wm, w_tau = head.unflatten(w.to(dt_))
    tau = 0.0 if w_tau is None else float(w_tau)
    t, m = head.logit_scale, head.m
    k_use = min(top, ctx["top_r"].shape[1])
    exact = neg == "exact"
    nx_max, ny_max = (float(v) for v in ctx.get("norm_max", (np.inf, np.inf)))
    # |dS_kn - r_k| <= t ||W|| (||x_k|| ||y_n|| + ||x_k|| ||ybar_k||) + |tau| (|S_kn| + |E S|)
    s_max = t * float(m.norm()) * nx_max * ny_max
    per_weight = 2 * t * float(wm.norm()) * nx_max * ny_max
    per_weight += abs(tau) * (s_max + float(ctx.get("es_max", np.inf)))
    dots, bounds = np.zeros(len(rows)), np.zeros(len(rows))

    def take(name, idx):
        return take_rows(ctx[name], idx, dt_, dev)

    for start in range(0, len(rows), chunk):
        rn = rows[start : start + chunk]
        xn, yn = take_rows(x, rn, dt_, dev), take_rows(y, rn, dt_, dev)
        xw = xn @ wm  # (K, dt)
        # the candidate's own terms, exactly
        r_n = t * (xw * take("ybar", rn)).sum(-1) + tau * take("es_r", rn)
        c_n = t * ((take("xbar", rn) @ wm) * yn).sum(-1) + tau * take("es_c", rn)
        ds_nn = t * (xw * yn).sum(-1) + tau * t * ((xn @ m) * yn).sum(-1)
        dot = -2.0 * ds_nn + r_n + c_n
        bound = torch.zeros(len(rn), dtype=dt_, device=dev)
        for side, own, partner in (("r", x, "ybar"), ("c", y, "xbar")):
            wt, rest, safe = _members(ctx, rn, side, k_use, exact, dt_, dev)
            shape = (*safe.shape, -1)
            mem = take_rows(own, safe.reshape(-1), dt_, dev).reshape(shape)  # x_k (r) or y_k (c)
            par = take(partner, safe.reshape(-1)).reshape(shape)  # ybar_k or xbar_k
            es_k = take(f"es_{side}", safe.reshape(-1)).reshape(safe.shape)
            if side == "r":  # dS_kn = t x_k^T W y_n, r_k = t x_k^T W ybar_k
                kw = mem @ wm
                ds = t * (kw * yn[:, None]).sum(-1) + tau * t * (mem * (yn @ m.T)[:, None]).sum(-1)
                rk = t * (kw * par).sum(-1)
            else:  # dS_nk = t x_n^T W y_k, c_k = t xbar_k^T W y_k
                ds = t * (mem * xw[:, None]).sum(-1) + tau * t * (mem * (xn @ m)[:, None]).sum(-1)
                rk = t * ((par @ wm) * mem).sum(-1)
            dot = dot + (wt * (ds - rk - tau * es_k)).sum(-1)
            bound = bound + rest * per_weight
        dots[start : start + len(rn)] = dot.cpu().numpy()
        bounds[start : start + len(rn)] = bound.cpu().numpy()
    return dots, bounds


def context_norms(
    head: Head,
    x,
    y,
    ctx: dict,
    ekfac,
    rows: np.ndarray,
    *,
    top: int = DEFAULT_TOP,
    neg: str = "exact",
    chunk: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """||H^-1 grad R_n|| under EK-FAC for ``rows`` from the stored context, and a bound on
    what ``top`` drops.

    grad R_n = t [x_n (ybar_n - 2 y_n)^T + xbar_n y_n^T + sum_k A_kn x_k (y_n - ybar_k)^T
    + sum_k Bq_nk (x_n - xbar_k) y_k^T] has rank 2 + 2 top, so its EK-FAC rotation
    Q1^T G Q2 costs O(top d^2) instead of the batch pass and two d^3 products. Fixed logit
    scale only (the learned scale's Schur block needs the full gradient).
    """
    if head.learn_scale:
        raise ValueError("context_norms needs a fixed logit scale")
    rows = np.asarray(rows, dtype=np.int64)
    dev, dt_ = head.m.device, head.dtype
    t = head.logit_scale
    k_use = min(top, ctx["top_r"].shape[1])
    exact = neg == "exact"
    q1, q2, diag = ekfac.q1.to(dt_), ekfac.q2.to(dt_), ekfac.diag.to(dt_)
    nx_max, ny_max = (float(v) for v in ctx.get("norm_max", (np.inf, np.inf)))
    # a dropped member adds at most t w ||x|| 2||y|| to ||G||_F; EK-FAC divides by >= min D
    per_weight = 2 * t * nx_max * ny_max / float(diag.min())
    norms, bounds = np.zeros(len(rows)), np.zeros(len(rows))

    def take(arr, idx):
        return take_rows(arr, idx, dt_, dev)

    for start in range(0, len(rows), chunk):
        rn = rows[start : start + chunk]
        xn, yn = take(x, rn), take(y, rn)
        u = [xn, take(ctx["xbar"], rn)]
        v = [take(ctx["ybar"], rn) - 2 * yn, yn]
        rest_all = torch.zeros(len(rn), dtype=dt_, device=dev)
        for side in SIDES:
            wt, rest, safe = _members(ctx, rn, side, k_use, exact, dt_, dev)
            flat, shape = safe.reshape(-1), (*safe.shape, -1)
            if side == "r":  # A_kn x_k (y_n - ybar_k)^T
                u.append(wt[..., None] * take(x, flat).reshape(shape))
                v.append(yn[:, None] - take(ctx["ybar"], flat).reshape(shape))
            else:  # Bq_nk (x_n - xbar_k) y_k^T
                u.append(wt[..., None] * (xn[:, None] - take(ctx["xbar"], flat).reshape(shape)))
                v.append(take(y, flat).reshape(shape))
            rest_all = rest_all + rest
        uu = torch.cat([a if a.dim() == 3 else a[:, None] for a in u], 1)  # (K, r, di)
        vv = torch.cat([a if a.dim() == 3 else a[:, None] for a in v], 1)  # (K, r, dt)
        g_rot = t * (uu @ q1).transpose(-1, -2) @ (vv @ q2)  # Q1^T G Q2
        norms[start : start + len(rn)] = (g_rot / diag).flatten(1).norm(dim=1).cpu().numpy()
        bounds[start : start + len(rn)] = (rest_all * per_weight).cpu().numpy()
    return norms, bounds
