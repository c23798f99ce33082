"""Distances between weight vectors (rows of a matrix or flat tensors): cosine, angular,
Euclidean, and the log of their norms' ratio."""

from __future__ import annotations

import math

import torch


def cosine_similarity(
    a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = 1e-12
) -> torch.Tensor:
    """Cosine similarity along ``dim``; zero vectors get similarity 0 rather than NaN."""
    num = (a * b).sum(dim=dim)
    den = a.norm(dim=dim) * b.norm(dim=dim)
    return torch.where(den > eps, num / den.clamp_min(eps), torch.zeros_like(num))


def angular_distance(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """arccos(cos(a, b)) / pi in [0, 1]: invariant to positive rescaling of either input.

    Uses atan2 of the sine and cosine parts, which stays accurate for nearly parallel vectors
    where arccos of a rounded cosine loses half the digits. Each vector is first divided by its
    largest absolute entry (the angle does not change), so tiny weights whose squared norm
    would underflow keep their direction.

    Zero vectors (every entry exactly zero, as the L1 / group-lasso proximal steps produce)
    have no direction, so the angle is undefined there and this is a convention:

    - both zero: 0. Nothing changed; a dead unit that stays dead has not drifted, and must not
      outrank units that really rotated.
    - exactly one zero: 1, the maximum. A unit that died (nonzero -> zero) lost its whole
      input dependence, which is all the old tasks read from it; one that was born
      (zero -> nonzero) gained one that the old tasks never had. Either is at least as large a
      change as any rotation, so it ranks with a sign reversal at the top, and any split
      threshold below 1 selects it. The value keeps the distance symmetric in ``a`` and ``b``.

    The previous convention (0.5 whenever either vector is zero) gave dead units a mid-high
    drift and made a zero vector and its rescaling look 0.5 apart.
    """
    if a.shape[dim] == 0:  # no entries: both vectors are zero
        return a.new_zeros(torch.broadcast_shapes(a.shape, b.shape)).sum(dim=dim)
    scale_a = a.abs().amax(dim=dim, keepdim=True)
    scale_b = b.abs().amax(dim=dim, keepdim=True)
    zero_a = (scale_a == 0).squeeze(dim)
    zero_b = (scale_b == 0).squeeze(dim)
    a = a / torch.where(scale_a == 0, torch.ones_like(scale_a), scale_a)
    b = b / torch.where(scale_b == 0, torch.ones_like(scale_b), scale_b)
    na = a.norm(dim=dim)
    nb = b.norm(dim=dim)
    cross = (a * nb.unsqueeze(dim) - b * na.unsqueeze(dim)).norm(dim=dim)
    summ = (a * nb.unsqueeze(dim) + b * na.unsqueeze(dim)).norm(dim=dim)
    ang = 2.0 * torch.atan2(cross, summ) / math.pi
    return torch.where(zero_a != zero_b, torch.ones_like(ang), ang)


def euclidean_distance(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Plain L2 distance, the Minkowski baseline that angular distance replaces."""
    return (a - b).norm(dim=dim)


def log_norm_ratio(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """|log(||b|| / ||a||)|: the change of scale that angular distance cannot see (norms are
    clamped at the dtype's smallest normal number, so a zero vector gives a finite value)."""
    tiny = torch.finfo(a.dtype).tiny
    return (b.norm(dim=dim).clamp_min(tiny).log() - a.norm(dim=dim).clamp_min(tiny).log()).abs()
