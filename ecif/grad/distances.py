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
    where arccos of a rounded cosine loses half the digits.
    """
    num = (a * b).sum(dim=dim)
    na = a.norm(dim=dim)
    nb = b.norm(dim=dim)
    cross = (a * nb.unsqueeze(dim) - b * na.unsqueeze(dim)).norm(dim=dim)
    summ = (a * nb.unsqueeze(dim) + b * na.unsqueeze(dim)).norm(dim=dim)
    ang = 2.0 * torch.atan2(cross, summ)
    zero = (na == 0) | (nb == 0)
    return torch.where(zero, torch.full_like(num, 0.5), ang / math.pi)


def euclidean_distance(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Plain L2 distance, the Minkowski baseline that angular distance replaces."""
    return (a - b).norm(dim=dim)


def log_norm_ratio(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """|log(||b|| / ||a||)|: the change of scale that angular distance cannot see (norms are
    clamped at the dtype's smallest normal number, so a zero vector gives a finite value)."""
    tiny = torch.finfo(a.dtype).tiny
    return (b.norm(dim=dim).clamp_min(tiny).log() - a.norm(dim=dim).clamp_min(tiny).log()).abs()
