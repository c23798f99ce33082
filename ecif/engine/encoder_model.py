"""The model modes' objective: symmetric InfoNCE through a trainable part of the encoders.

J(theta) = (1/N) sum_b L_b(theta) + (lam/2) ||theta - theta_0||^2, the same objective and
fixed batch partition as the head (docs/math.md section 2), with the logits of batch b
``S = t x y^T`` where ``(x, y, log t) = part.embed(theta, features of b)``. The model is not
convex in theta, so the curvature used for Newton steps and for H^-1 is by default the
Gauss-Newton matrix G = J_S^T H_S J_S (H_S the loss's Hessian in the logits, which is
positive semi-definite: InfoNCE is convex in its logits) plus the pull; the exact Hessian is
available (``curvature="exact"``) by double backward. Section 12 of docs/math.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import func

from ecif.engine.batches import Partition, make_partition, take_rows
from ecif.engine.contrastive import batch_stats, loss_hessian_logits, pair_losses
from ecif.engine.encoder_part import TrainablePart

CURVATURES = ("gauss_newton", "exact")
# rows of features a pass holds at a time (whole batches); token caches are wide, keep it modest
MODEL_CHUNK_ROWS = 2048


@dataclass
class EncoderModel:
    """A fitted trainable part: the model-mode counterpart of ``ecif.engine.head.Head``."""

    part: TrainablePart
    theta: torch.Tensor
    theta0: torch.Tensor
    lam: float
    partition: Partition
    n_norm: int
    curvature: str = "exact"
    info: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    @property
    def device(self) -> torch.device:
        return self.theta.device

    @property
    def batch_size(self) -> int:
        return self.partition.batch_size

    @property
    def seed(self) -> int:
        return self.partition.seed

    @property
    def chunk_rows(self) -> int:
        """Rows a pass holds at a time: the part's ``chunk_rows`` (token states are wide)."""
        return int(getattr(self.part, "chunk_rows", MODEL_CHUNK_ROWS))

    @property
    def num_params(self) -> int:
        return int(self.theta.numel())

    def chunks(self, image, text, partition: Partition | None = None) -> Iterator[FeatureChunk]:
        """The rows' chunks in the model's dtype, device and chunk size, batched by
        ``partition`` (the model's own unless given)."""
        return feature_chunks(
            image,
            text,
            self.partition if partition is None else partition,
            dtype=self.dtype,
            device=self.device,
            rows_per_chunk=self.chunk_rows,
        )

    @property
    def logit_scale(self) -> float:
        """The temperature t at theta (fixed, or fitted with ``learn_scale``)."""
        p = self.part.layout.unflatten(self.theta)
        return (
            float(p["log_scale"].exp()) if "log_scale" in p else float(np.exp(self.part.log_scale))
        )

    def state_dict(self) -> dict:
        """Everything that rebuilds the fitted part (saved as an audit's model.pt)."""
        return {
            "params": self.part.kind,
            "part": self.part.state(),
            "theta": self.theta.detach().cpu(),
            "theta0": self.theta0.detach().cpu(),
            "lam": self.lam,
            "partition": self.partition.index,
            "partition_n": self.partition.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "n_norm": self.n_norm,
            "curvature": self.curvature,
            "info": dict(self.info),
        }

    @classmethod
    def from_state_dict(cls, sd: dict) -> EncoderModel:
        """The fitted part ``state_dict`` saved (an audit's model.pt holds a list of them)."""
        from ecif.engine.encoder_part import ProjectionPart
        from ecif.engine.lora_part import LoraPart

        kinds = {"projection": ProjectionPart, "lora": LoraPart}
        if sd.get("params") not in kinds:
            raise ValueError(f"unknown trainable part {sd.get('params')!r} in the saved model")
        index = np.asarray(sd["partition"])
        n = int(sd.get("partition_n", (index >= 0).sum()))
        return cls(
            part=kinds[sd["params"]].from_state(sd["part"]),
            theta=sd["theta"],
            theta0=sd["theta0"],
            lam=float(sd["lam"]),
            partition=Partition(index, int(sd["batch_size"]), int(sd["seed"]), n),
            n_norm=int(sd["n_norm"]),
            curvature=str(sd.get("curvature", "exact")),
            info=dict(sd.get("info", {})),
        )

    def to(self, dtype: torch.dtype) -> EncoderModel:
        """The same model with theta and theta_0 in ``dtype``."""
        return replace(self, theta=self.theta.to(dtype), theta0=self.theta0.to(dtype))

    def with_curvature(self, curvature: str) -> EncoderModel:
        """The same fitted model with another curvature for its solves."""
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}; got {curvature!r}")
        return replace(self, curvature=curvature)

    def with_theta(self, theta: torch.Tensor, info: dict | None = None) -> EncoderModel:
        return replace(self, theta=theta, info=dict(info or self.info))


@dataclass
class FeatureChunk:
    """A stack of batches of cached features: image (c, B, ...), text (c, B, ...), mask (c, B)."""

    image: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor
    rows: np.ndarray


def feature_chunks(
    image,
    text,
    partition: Partition,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    batch_ids: np.ndarray | None = None,
    rows_per_chunk: int = MODEL_CHUNK_ROWS,
) -> Iterator[FeatureChunk]:
    """Stacks of batches gathered from row arrays (any trailing shape: pooled features or
    token states); padded slots are zero and masked out."""
    index = partition.index
    ids = np.arange(index.shape[0]) if batch_ids is None else np.asarray(batch_ids)
    b = partition.width
    per = max(1, rows_per_chunk // b)
    for start in range(0, len(ids), per):
        rows = index[ids[start : start + per]]
        mask = rows >= 0
        safe = np.where(mask, rows, 0).reshape(-1)
        m = torch.from_numpy(mask).to(device)
        fi = take_rows(image, safe, dtype, device)
        ft = take_rows(text, safe, dtype, device)
        fi = fi.reshape(len(rows), b, *fi.shape[1:])
        ft = ft.reshape(len(rows), b, *ft.shape[1:])
        fi = fi * m.reshape(*m.shape, *([1] * (fi.dim() - 2)))
        ft = ft * m.reshape(*m.shape, *([1] * (ft.dim() - 2)))
        yield FeatureChunk(fi, ft, m, rows)


def batch_logits(part: TrainablePart, theta: torch.Tensor, ch: FeatureChunk) -> torch.Tensor:
    """S = t x y^T for every batch of the chunk, (c, B, B)."""
    x, y, log_t = part.embed(theta, ch.image, ch.text)
    return log_t.exp() * x @ y.transpose(-1, -2)


def chunk_loss(part: TrainablePart, theta: torch.Tensor, ch: FeatureChunk) -> torch.Tensor:
    """sum_b L_b over the chunk's batches (masked members contribute nothing)."""
    return pair_losses(batch_stats(batch_logits(part, theta, ch), ch.mask)).sum()


class EncoderObjective:
    """J(theta) over a model's partition, streamed by chunks (an ``ecif.grad`` Objective)."""

    def __init__(self, model: EncoderModel, image, text, curvature: str | None = None):
        self.model = model
        self.image, self.text = image, text
        self.curvature = curvature or model.curvature
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}; got {self.curvature!r}")

    def chunks(self) -> Iterator[FeatureChunk]:
        return self.model.chunks(self.image, self.text)

    def pull(self, theta: torch.Tensor) -> torch.Tensor:
        return theta - self.model.theta0

    def value_and_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        m = self.model
        total = torch.zeros((), dtype=m.dtype, device=m.device)
        grad = torch.zeros_like(theta)
        for ch in self.chunks():
            g, v = func.grad_and_value(lambda th, ch=ch: chunk_loss(m.part, th, ch))(theta)
            total += v.detach()
            grad += g
        d = self.pull(theta)
        value = float(total) / m.n_norm + 0.5 * m.lam * float(d @ d)
        return value, grad / m.n_norm + m.lam * d

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(curvature + lam I) v for v of shape (P,) or (K, P)."""
        if v.dim() == 2:
            return torch.stack([self.hvp(theta, u) for u in v])
        m = self.model
        out = torch.zeros_like(v)
        for ch in self.chunks():
            out += self._chunk_product(theta, v, ch)
        return out / m.n_norm + m.lam * v

    def _chunk_product(self, theta, v, ch: FeatureChunk) -> torch.Tensor:
        part = self.model.part
        if self.curvature == "exact":  # reverse over reverse: H is symmetric, so H v = v^T H;
            # forward over reverse took 1.3-2x the time (torch's decompositions; bench_hvp.py)
            grad_fn = func.grad(lambda th: chunk_loss(part, th, ch))
            return func.vjp(grad_fn, theta)[1](v)[0]
        logits = lambda th: batch_logits(part, th, ch)  # noqa: E731
        s, ds = func.jvp(logits, (theta,), (v,))
        h_ds = loss_hessian_logits(batch_stats(s.detach(), ch.mask), ds)
        _, pull_back = func.vjp(logits, theta)
        return pull_back(h_ds)[0]


def new_model(
    part: TrainablePart,
    n: int,
    *,
    lam: float,
    batch_size: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    groups: np.ndarray | None = None,
    curvature: str = "exact",
) -> EncoderModel:
    """The starting point: theta = theta_0 = the pretrained values, a fresh partition."""
    if lam <= 0:
        raise ValueError("lam must be > 0: the pull keeps the fit near the pretrained weights")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}; got {curvature!r}")
    theta0 = part.initial().to(dtype=dtype, device=device)
    return EncoderModel(
        part=part,
        theta=theta0.clone(),
        theta0=theta0,
        lam=float(lam),
        partition=make_partition(n, batch_size, seed, groups=groups),
        n_norm=n,
        curvature=curvature,
    )


def loss_gradient(model: EncoderModel, image, text) -> torch.Tensor:
    """Gradient of the mean per-pair InfoNCE on a (validation) set w.r.t. theta, no pull; the
    set is cut into batches of the model's batch size with its seed (as the head does)."""
    part = make_partition(len(image), model.batch_size, model.seed)
    grad = torch.zeros_like(model.theta)
    count = 0
    for ch in model.chunks(image, text, part):
        grad += func.grad(lambda th, ch=ch: chunk_loss(model.part, th, ch))(model.theta)
        count += int(ch.mask.sum())
    return grad / count


def mean_loss(model: EncoderModel, image, text) -> float:
    """The mean per-pair InfoNCE on a set (batches as in ``loss_gradient``)."""
    part = make_partition(len(image), model.batch_size, model.seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for ch in model.chunks(image, text, part):
            total += float(chunk_loss(model.part, model.theta, ch))
            count += int(ch.mask.sum())
    return total / count
