"""Per-token divergences between teacher and student next-token distributions, with masks.

Distillation losses differ mainly in which divergence they put on each token and how tokens
are weighted; keeping the divergences here (pure functions of logits) lets every companion
share one tested implementation. All functions work on logits of shape ``(..., vocab)`` and
return one value per token (shape ``(...)``); reduce with :func:`masked_mean`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("fkl", "rkl", "jsd")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits / temperature, dim=-1)


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_T || p_S) per token: mass-covering, the classic KD objective."""
    ls = _log_probs(student_logits, temperature)
    lt = _log_probs(teacher_logits, temperature)
    return (lt.exp() * (lt - ls)).sum(-1)


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_S || p_T) per token: mode-seeking, the usual choice for on-policy distillation."""
    ls = _log_probs(student_logits, temperature)
    lt = _log_probs(teacher_logits, temperature)
    return (ls.exp() * (ls - lt)).sum(-1)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """beta*KL(p_T||m) + (1-beta)*KL(p_S||m), m = beta*p_T + (1-beta)*p_S (GKD's JSD(beta)).

    beta = 0.5 is the symmetric Jensen-Shannon divergence, bounded by log 2. The endpoints
    beta in {0, 1} are identically zero, so beta must lie strictly inside (0, 1).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    ls = _log_probs(student_logits, temperature)
    lt = _log_probs(teacher_logits, temperature)
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log1p(-beta)]), dim=0)
    kl_t = (lt.exp() * (lt - lm)).sum(-1)
    kl_s = (ls.exp() * (ls - lm)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "fkl",
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Dispatch by name: ``fkl`` (forward KL), ``rkl`` (reverse KL), ``jsd`` (JSD(beta))."""
    if kind == "fkl":
        return forward_kl(student_logits, teacher_logits, temperature)
    if kind == "rkl":
        return reverse_kl(student_logits, teacher_logits, temperature)
    if kind == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """sum(weights * values over mask) / (number of masked tokens).

    The denominator counts tokens, not weights, so per-token weights scale the pull on each
    token and weights of one give exactly the plain masked mean.
    """
    m = mask.to(values.dtype)
    v = values * m if weights is None else values * weights.to(values.dtype) * m
    return v.sum() / m.sum().clamp_min(1.0)


def masked_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "fkl",
    *,
    weights: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence averaged over the masked tokens, optionally weighted per token."""
    per_tok = token_divergence(
        student_logits, teacher_logits, kind, beta=beta, temperature=temperature
    )
    return masked_mean(per_tok, mask, weights)
