"""The bilinear CLIP head S_ij = t x_i^T M y_j over frozen embeddings, its objective and fit.

theta = vec(M) (plus log t when the logit scale is learned). The objective
J = (1/N) sum_b L_b + (lambda/2) ||theta - theta_0||^2 is strongly convex in M, so the fit
has one optimum and leave-one-out retraining is verifiable (docs/math.md section 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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


class HeadObjective:
    """J(theta), its gradient and exact Hessian-vector products over a fixed partition.

    Matrix-free: every quantity is a stream over batch stacks, so memory is bounded by the
    chunk, never by N (docs/math.md section 6).
    """

    def __init__(
        self,
        head: Head,
        x,
        y,
        *,
        batch_ids: np.ndarray | None = None,
        weight: float = 1.0,
        cache_bytes: int = 0,
    ):
        self.head = head
        self.x, self.y = x, y
        self.batch_ids = batch_ids
        self.weight = weight  # rescales a subsampled data term back to the full sum
        self.di, self.dt = head.m.shape
        # Hessian-vector products at one theta (CG) keep the first chunks' embeddings and
        # softmaxes in memory up to this many bytes, skipping their reads and forward pass
        self.cache_bytes = cache_bytes
        self._cache: list = []
        self._cache_theta: torch.Tensor | None = None
        self._cache_batches = 0

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(M, t) at ``theta``: the adapter as a matrix and the logit scale as a number."""
        m = theta[: self.di * self.dt].reshape(self.di, self.dt)
        t = math.exp(float(theta[-1])) if self.head.learn_scale else self.head.logit_scale
        return m, t

    def chunks(self) -> Iterable[Chunk]:
        """The stacks of batches the data term sums over (a subclass may supply its own)."""
        h = self.head
        return iter_chunks(
            self.x, self.y, h.partition, dtype=h.dtype, device=h.m.device, batch_ids=self.batch_ids
        )

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
        loss = torch.zeros((), dtype=theta.dtype, device=theta.device)
        g_m = torch.zeros_like(m)
        g_tau = torch.zeros((), dtype=theta.dtype, device=theta.device)
        for ch in self.chunks():
            s = t * (ch.x @ m) @ ch.y.transpose(-1, -2)
            st = batch_stats(s, ch.mask)
            loss = loss + pair_losses(st).sum()
            g = loss_grad_logits(st)
            g_m = g_m + t * torch.einsum("cbi,cbj->ij", ch.x, g @ ch.y)
            if self.head.learn_scale:
                g_tau = g_tau + (g * s).sum()
        scale = self.weight / self.head.n_norm
        r = self._reg(theta)
        grad = (
            torch.cat([g_m.reshape(-1), g_tau.reshape(1)])
            if self.head.learn_scale
            else g_m.reshape(-1)
        )
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
        h_m = torch.zeros_like(vm)
        h_tau = torch.zeros(k, dtype=v.dtype, device=v.device)
        for ch, s, st in self._forward_at(theta):
            yt = ch.y.transpose(-1, -2)
            ds = t * torch.einsum("cbi,kij->kcbj", ch.x, vm) @ yt
            if delta is not None:
                ds = ds + delta[:, None, None, None] * s
            dg = loss_hessian_logits(st, ds)
            h_m = h_m + t * torch.einsum("cbi,kcbj->kij", ch.x, dg @ ch.y)
            if delta is not None:
                g = loss_grad_logits(st)
                xgy = t * torch.einsum("cbi,cbj->ij", ch.x, g @ ch.y)
                h_m = h_m + delta[:, None, None] * xgy
                h_tau = h_tau + (dg * s).sum((1, 2, 3)) + (g * ds).sum((1, 2, 3))
        out = h_m.reshape(k, -1)
        if delta is not None:
            out = torch.cat([out, h_tau[:, None]], dim=1)
        out = out * (self.weight / self.head.n_norm) + self.head.lam * vv
        return out[0] if single else out

    def _forward_at(self, theta: torch.Tensor):
        """(chunk, S, softmaxes) for every chunk at theta, the cached ones first (see
        ``cache_bytes``); the rest read and computed, filling the cache on a new theta."""
        m, t = self.split(theta)
        h = self.head
        hit = self._cache_theta is not None and torch.equal(self._cache_theta, theta)
        if hit:
            yield from self._cache
        else:
            self._cache, self._cache_batches = [], 0
            self._cache_theta = theta.detach().clone() if self.cache_bytes > 0 else None
        ids = np.arange(h.partition.num_batches) if self.batch_ids is None else self.batch_ids
        filling, used = not hit and self.cache_bytes > 0, 0
        rest = (
            self.chunks()
            if self.cache_bytes <= 0
            else iter_chunks(
                self.x,
                self.y,
                h.partition,
                dtype=h.dtype,
                device=h.m.device,
                batch_ids=np.asarray(ids)[self._cache_batches :],
            )
        )
        for ch in rest:
            s = t * (ch.x @ m) @ ch.y.transpose(-1, -2)
            st = batch_stats(s, ch.mask)
            if filling:
                keep = (ch, s if h.learn_scale else None, replace(st, log_p=None, log_q=None))
                size = sum(a.numel() * a.element_size() for a in (ch.x, ch.y, st.p, st.q))
                size += s.numel() * s.element_size() if h.learn_scale else 0
                filling = used + size <= self.cache_bytes
                if filling:
                    self._cache.append(keep)
                    self._cache_batches += len(ch.batch_ids)
                    used += size
            yield ch, s, st

    def dense_hessian(self, theta: torch.Tensor) -> torch.Tensor:
        """The dense Hessian, assembled from its Kronecker structure (no P Hessian-vector products).

        H_MM = (t^2/N) [sum_i x_i x_i^T (x) Cov_{p_i}(y) + sum_j Cov_{q_j}(x) (x) y_j y_j^T] + lambda I;
        the log-scale row and column, when learned, come from one exact Hessian-vector product.
        """
        m, t = self.split(theta)
        di, dt = self.di, self.dt
        acc = torch.zeros(di * di, dt * dt, dtype=theta.dtype, device=theta.device)
        for ch in self.chunks():
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
            acc += xx.T @ cov_y.reshape(-1, dt * dt) + cov_x.reshape(-1, di * di).T @ yy
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
