"""The bilinear CLIP head S_ij = t x_i^T M y_j over frozen embeddings, its objective and fit.

theta = vec(M) (plus log t when the logit scale is learned). The objective
J = (1/N) sum_b L_b + (lambda/2) ||theta - theta_0||^2 is strongly convex in M, so the fit
has one optimum and leave-one-out retraining is verifiable (docs/math.md section 1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ecif.engine.batches import Chunk, Partition, iter_chunks, make_partition
from ecif.engine.contrastive import (
    batch_stats,
    loss_grad_logits,
    loss_hessian_logits,
    pair_losses,
)
from ecif.engine.row_sums import LocalRows, Pass, RowSource, Sums

DTYPES = {"float32": torch.float32, "float64": torch.float64}
CLIP_LOGIT_SCALE = 100.0  # CLIP's trained logit scale: the head's when nothing else is known
# the dense Hessian is P x P (128 MiB in float64 at this size): assembled, factored or used
# for Newton steps only up to this many parameters (d_img = d_txt = 64)
DENSE_HESSIAN_MAX_PARAMS = 4096


@dataclass
class Head:
    """A fitted head: the adapter M, the logit scale, and everything needed to reproduce it."""

    m: torch.Tensor  # (d_img, d_txt)
    m0: torch.Tensor
    log_scale: float
    log_scale0: float
    learn_scale: bool
    lam: float
    partition: Partition
    n_norm: int  # the 1/N of the objective: rows of the training set, removed ones included
    info: dict = field(default_factory=dict)

    @property
    def logit_scale(self) -> float:
        return math.exp(self.log_scale)

    @property
    def batch_size(self) -> int:
        return self.partition.batch_size

    @property
    def seed(self) -> int:
        return self.partition.seed

    @property
    def num_params(self) -> int:
        return self.m.numel() + int(self.learn_scale)

    @property
    def dtype(self) -> torch.dtype:
        return self.m.dtype

    def theta(self) -> torch.Tensor:
        """Flat parameter vector (vec(M), then log t if learned)."""
        parts = [self.m.reshape(-1)]
        if self.learn_scale:
            parts.append(torch.tensor([self.log_scale], dtype=self.m.dtype, device=self.m.device))
        return torch.cat(parts)

    def unflatten(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flat vectors (..., P) as their M part (..., d_img, d_txt) and their log-scale part
        (...), None when the scale is fixed: the layout of ``theta``."""
        di, dt = self.m.shape
        vm = v[..., : di * dt].reshape(*v.shape[:-1], di, dt)
        return vm, (v[..., -1] if self.learn_scale else None)

    def flatten(self, gm: torch.Tensor, g_tau: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse of ``unflatten``: (..., d_img, d_txt) and (...) to flat (..., P).
        ``g_tau`` is dropped when the scale is fixed and required when it is learned."""
        flat = gm.reshape(*gm.shape[:-2], -1)
        if self.learn_scale:
            if g_tau is None:
                raise ValueError("a head with a learned scale needs the log-scale part")
            flat = torch.cat([flat, g_tau.reshape(*gm.shape[:-2], 1)], dim=-1)
        return flat

    def with_theta(self, theta: torch.Tensor, **kw) -> Head:
        m = theta[: self.m.numel()].reshape(self.m.shape).clone()
        log_scale = float(theta[-1]) if self.learn_scale else self.log_scale
        return replace(self, m=m, log_scale=log_scale, **kw)

    def loss(self, data, batch_size: int | None = None, seed: int | None = None) -> float:
        """Mean per-pair symmetric InfoNCE (-log p_ii - log q_ii) on ``data``.

        ``data`` is an EmbeddingSet (or anything with ``.image``/``.text``) or an (X, Y) tuple.
        It is cut into batches of the head's batch size with the head's seed.
        """
        x, y = as_arrays(data)
        part = make_partition(
            len(x), batch_size or self.batch_size, self.seed if seed is None else seed
        )
        total = 0.0
        for ch in iter_chunks(x, y, part, dtype=self.dtype, device=self.m.device):
            s = self.logit_scale * (ch.x @ self.m) @ ch.y.transpose(-1, -2)
            total += float(pair_losses(batch_stats(s, ch.mask)).sum())
        return total / len(x)

    def state_dict(self) -> dict:
        """Plain tensors and numbers; torch.save-able, enough to rebuild the head exactly."""
        return {
            "m": self.m.cpu(),
            "m0": self.m0.cpu(),
            "log_scale": self.log_scale,
            "log_scale0": self.log_scale0,
            "learn_scale": self.learn_scale,
            "lam": self.lam,
            "partition_index": torch.from_numpy(self.partition.index),
            "batch_size": self.partition.batch_size,
            "seed": self.partition.seed,
            "n": self.partition.n,
            "n_norm": self.n_norm,
            "info": dict(self.info),
        }

    @classmethod
    def from_state_dict(cls, sd: dict) -> Head:
        part = Partition(
            index=sd["partition_index"].numpy(),
            batch_size=int(sd["batch_size"]),
            seed=int(sd["seed"]),
            n=int(sd["n"]),
        )
        return cls(
            m=sd["m"],
            m0=sd["m0"],
            log_scale=float(sd["log_scale"]),
            log_scale0=float(sd["log_scale0"]),
            learn_scale=bool(sd["learn_scale"]),
            lam=float(sd["lam"]),
            partition=part,
            n_norm=int(sd["n_norm"]),
            info=dict(sd.get("info", {})),
        )


def as_arrays(data):
    """(image, text) arrays from an EmbeddingSet-like object or a tuple."""
    if isinstance(data, tuple | list) and len(data) == 2:
        return data[0], data[1]
    if hasattr(data, "image") and hasattr(data, "text"):
        return data.image, data.text
    raise TypeError("expected an EmbeddingSet (with .image and .text) or an (image, text) tuple")


def pass_key(theta: torch.Tensor) -> bytes:
    """A short key of a parameter vector: passes at the same theta share cached chunks."""
    return hashlib.sha1(theta.detach().cpu().contiguous().numpy().tobytes()).digest()


def value_grad_terms(ch: Chunk, _state, m: torch.Tensor, t: float, learn_scale: bool):
    """A chunk's sum of pair losses, its gradient in M and in log t (zero when fixed)."""
    s = t * (ch.x @ m) @ ch.y.transpose(-1, -2)
    st = batch_stats(s, ch.mask)
    g = loss_grad_logits(st)
    g_m = t * torch.einsum("cbi,cbj->ij", ch.x, g @ ch.y)
    g_tau = (g * s).sum() if learn_scale else torch.zeros((), dtype=s.dtype, device=s.device)
    return pair_losses(st).sum(), g_m, g_tau


def forward_state(ch: Chunk, m: torch.Tensor, t: float, learn_scale: bool):
    """What Hessian-vector products at one theta reuse: the softmaxes (and S when the scale
    is learned)."""
    s = t * (ch.x @ m) @ ch.y.transpose(-1, -2)
    st = replace(batch_stats(s, ch.mask), log_p=None, log_q=None)
    return (s if learn_scale else None), st


def hvp_terms(ch: Chunk, state, t: float, vm: torch.Tensor, delta: torch.Tensor | None):
    """A chunk's part of H v for K directions: (K, d_img, d_txt) in M and (K,) in log t."""
    s, st = state
    yt = ch.y.transpose(-1, -2)
    ds = t * torch.einsum("cbi,kij->kcbj", ch.x, vm) @ yt
    if delta is not None:
        ds = ds + delta[:, None, None, None] * s
    dg = loss_hessian_logits(st, ds)
    h_m = t * torch.einsum("cbi,kcbj->kij", ch.x, dg @ ch.y)
    h_tau = torch.zeros(vm.shape[0], dtype=vm.dtype, device=vm.device)
    if delta is not None:
        g = loss_grad_logits(st)
        h_m = h_m + delta[:, None, None] * (t * torch.einsum("cbi,cbj->ij", ch.x, g @ ch.y))
        h_tau = (dg * s).sum((1, 2, 3)) + (g * ds).sum((1, 2, 3))
    return h_m, h_tau


def dense_terms(ch: Chunk, _state, m: torch.Tensor, t: float):
    """A chunk's part of the Kronecker sum behind the dense Hessian (d_img^2 x d_txt^2)."""
    di, dt = m.shape
    s = t * (ch.x @ m) @ ch.y.transpose(-1, -2)
    st = batch_stats(s, ch.mask)
    ybar, xbar = st.p @ ch.y, st.q.transpose(-1, -2) @ ch.x
    cov_y = (
        torch.einsum("cij,cjb,cje->cibe", st.p, ch.y, ch.y)
        - ybar[..., :, None] * ybar[..., None, :]
    )
    cov_x = (
        torch.einsum("cij,cia,cik->cjak", st.q, ch.x, ch.x)
        - xbar[..., :, None] * xbar[..., None, :]
    )
    xx = (ch.x[..., :, None] * ch.x[..., None, :]).reshape(-1, di * di)
    yy = (ch.y[..., :, None] * ch.y[..., None, :]).reshape(-1, dt * dt)
    return (xx.T @ cov_y.reshape(-1, dt * dt) + cov_x.reshape(-1, di * di).T @ yy,)


class HeadObjective:
    """J(theta), its gradient and exact Hessian-vector products over a fixed partition.

    Matrix-free: every quantity is a pass of a per-chunk term over the batches
    (``ecif.engine.row_sums``), so memory is bounded by the chunk, never by N (docs/math.md
    section 6), and the pass runs where ``rows`` keeps the pairs: this process by default,
    a cluster's workers with ``ecif.engine.cluster_rows.ClusterRows``.
    """

    def __init__(
        self,
        head: Head,
        x,
        y,
        *,
        batch_ids: np.ndarray | None = None,
        weight: float = 1.0,
        cache_bytes: int | None = None,
        rows: RowSource | None = None,
    ):
        self.head = head
        self.x, self.y = x, y
        self.batch_ids = batch_ids
        self.weight = weight  # rescales a subsampled data term back to the full sum
        self.di, self.dt = head.m.shape
        # Hessian-vector products at one theta (CG) keep the first chunks' embeddings and
        # softmaxes in memory up to ``cache_bytes``, skipping their reads and forward pass
        # (None: 0 here, the source's own budget for a given ``rows``)
        if rows is None:
            rows = LocalRows(x, y, cache_bytes or 0)
        elif cache_bytes is not None:
            rows = rows.with_cache(cache_bytes)
        self.rows = rows

    def with_head(self, head: Head, **kw) -> HeadObjective:
        """The same pairs (and where they are) for another head; ``kw``: other options."""
        opts = {"batch_ids": self.batch_ids, "weight": self.weight, "rows": self.rows, **kw}
        return HeadObjective(head, self.x, self.y, **opts)

    @property
    def cached_batches(self) -> int:
        """Batches whose chunks the Hessian-vector products keep in memory."""
        cache = getattr(self.rows, "cache", None)
        return 0 if cache is None else cache.batches

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(M, t) at ``theta``: the adapter as a matrix and the logit scale as a number."""
        m = theta[: self.di * self.dt].reshape(self.di, self.dt)
        t = math.exp(float(theta[-1])) if self.head.learn_scale else self.head.logit_scale
        return m, t

    def reduce(self, p: Pass) -> Sums:
        """The pass's sums over this objective's batches, on the head's device."""
        h = self.head
        out = self.rows.reduce(p, h.partition, self.batch_ids, h.dtype, h.m.device)
        if out is None:
            raise ValueError("the objective has no batches")
        return tuple(a.to(h.m.device) for a in out)

    def _reg(self, theta: torch.Tensor) -> torch.Tensor:
        return theta - self.head_theta0()

    def head_theta0(self) -> torch.Tensor:
        h = self.head
        parts = [h.m0.reshape(-1)]
        if h.learn_scale:
            parts.append(torch.tensor([h.log_scale0], dtype=h.dtype, device=h.m.device))
        return torch.cat(parts)

    def value_and_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        m, t = self.split(theta)
        learn = self.head.learn_scale
        loss, g_m, g_tau = self.reduce(Pass(value_grad_terms, (m, t, learn)))
        scale = self.weight / self.head.n_norm
        r = self._reg(theta)
        grad = torch.cat([g_m.reshape(-1), g_tau.reshape(1)]) if learn else g_m.reshape(-1)
        value = float(loss) * scale + 0.5 * self.head.lam * float(r @ r)
        return value, grad * scale + self.head.lam * r

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exact H v for v of shape (P,) or (K, P)."""
        single = v.dim() == 1
        vv = v.unsqueeze(0) if single else v
        m, t = self.split(theta)
        k = vv.shape[0]
        vm = vv[:, : self.di * self.dt].reshape(k, self.di, self.dt)
        delta = vv[:, -1] if self.head.learn_scale else None
        learn = self.head.learn_scale
        p = Pass(hvp_terms, (t, vm, delta), forward_state, (m, t, learn), pass_key(theta))
        h_m, h_tau = self.reduce(p)
        out = h_m.reshape(k, -1)
        if delta is not None:
            out = torch.cat([out, h_tau[:, None]], dim=1)
        out = out * (self.weight / self.head.n_norm) + self.head.lam * vv
        return out[0] if single else out

    def dense_hessian(self, theta: torch.Tensor) -> torch.Tensor:
        """The dense Hessian, assembled from its Kronecker structure (no P Hessian-vector products).

        H_MM = (t^2/N) [sum_i x_i x_i^T (x) Cov_{p_i}(y) + sum_j Cov_{q_j}(x) (x) y_j y_j^T] + lambda I;
        the log-scale row and column, when learned, come from one exact Hessian-vector product.
        """
        m, t = self.split(theta)
        di, dt = self.di, self.dt
        (acc,) = self.reduce(Pass(dense_terms, (m, t)))
        h = acc.reshape(di, di, dt, dt).permute(0, 2, 1, 3).reshape(di * dt, di * dt)
        h = h * (t * t * self.weight / self.head.n_norm)
        p = self.head.num_params
        out = torch.zeros(p, p, dtype=theta.dtype, device=theta.device)
        out[: di * dt, : di * dt] = 0.5 * (h + h.T)
        out.diagonal().add_(self.head.lam)
        if self.head.learn_scale:
            e = torch.zeros(p, dtype=theta.dtype, device=theta.device)
            e[-1] = 1.0
            col = self.hvp(theta, e)
            out[-1, :] = col
            out[:, -1] = col
        return out
