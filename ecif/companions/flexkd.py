"""Flex-KD: parameter-free feature distillation across a width mismatch (Saadi & Wang, 2025).

Reconstruction (see docs/companions.md): score each teacher hidden dimension j by how much the
frozen teacher's task loss depends on it, s_j = sum over supervised positions |dL/dh_T,j|;
keep the top d_S dimensions; train the student with
L_task + alpha * L_logitKD + beta * L_feat, where L_feat = mean over selected dimensions of
(1 - Pearson correlation over the batch) between student dimension i and selected teacher
dimension i. Correlation is scale- and shift-free, so no projector has to be learned.

Baselines built from the same parts: a learned linear projector with an MSE to the full
teacher state, and the control that applies the same correlation loss to random dimensions.
The scoring and the divergences come from :mod:`ecif.grad`.

With a Hugging Face GPT-2 teacher (not needed by the tests), hook ``teacher.transformer.ln_f``
and take ``out.hidden_states[-1]`` (``output_hidden_states=True``) as the hidden state::

    def task_loss(batch):
        logits = teacher(batch["input_ids"]).logits[:, :-1]
        ce = F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten(),
                             reduction="none")
        sup = batch["labels_mask"][:, 1:]
        return (ce * sup.flatten()).sum(), F.pad(sup, (0, 1))

    scores = teacher_dimension_scores(teacher.transformer.ln_f, loader, task_loss)
    selection = select_top_dims(scores, student.config.n_embd)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ecif.grad import (
    activation_and_grad,
    dimension_scores,
    gradient_second_moment,
    masked_divergence,
    masked_mean,
    top_directions,
)

FEATURE_MODES = ("flex", "random", "directions", "projector", "none")


@dataclass
class FlexKDConfig:
    """Loss weights and choices; defaults follow the reconstruction."""

    alpha: float = 1.0  # logit KD weight
    beta: float = 1.0  # feature loss weight
    divergence: str = "fkl"  # inner logit divergence (see ecif.grad.divergences)
    temperature: float = 1.0
    score: str = "abs"  # abs | squared | grad_x_act
    eps: float = 1e-6  # variance floor inside the Pearson correlation


@dataclass
class FeatureSelection:
    """Which teacher features the student's hidden dimensions are aligned with.

    Exactly one of ``dims`` (coordinate indices, length d_S) or ``basis`` (d_T x d_S
    orthonormal directions) is set.
    """

    dims: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    scores: torch.Tensor | None = field(default=None, repr=False)

    def project(self, teacher_hidden: torch.Tensor) -> torch.Tensor:
        """Teacher features (..., d_S) that the student's hidden state is matched to."""
        if self.dims is not None:
            return teacher_hidden.index_select(-1, self.dims.to(teacher_hidden.device))
        if self.basis is not None:
            return teacher_hidden @ self.basis.to(teacher_hidden)
        raise ValueError("empty FeatureSelection")

    @property
    def size(self) -> int:
        return int(self.dims.numel()) if self.dims is not None else int(self.basis.shape[1])


TaskLoss = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def _collect(
    layer: nn.Module, batches: Iterable[Any], task_loss: TaskLoss
) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for batch in batches:
        holder: list[torch.Tensor] = []

        def run(batch=batch, holder=holder):
            loss, mask = task_loss(batch)
            holder.append(mask)
            return loss

        act, grad = activation_and_grad(layer, run)
        yield act, grad, holder[0]


def teacher_dimension_scores(
    layer: nn.Module, batches: Iterable[Any], task_loss: TaskLoss, mode: str = "abs"
) -> torch.Tensor:
    """s_j summed over every supervised position of every batch (teacher frozen, run once).

    ``task_loss(batch)`` runs the teacher and returns (loss summed over supervised tokens,
    mask of supervised positions shaped like the hooked output without its last dim);
    ``layer`` is the module whose output is the hidden state (e.g. the final layer norm).
    """
    total = None
    for act, grad, mask in _collect(layer, batches, task_loss):
        s = dimension_scores(grad, mask, mode, act)
        total = s if total is None else total + s
    if total is None:
        raise ValueError("no batches")
    return total


def select_top_dims(scores: torch.Tensor, k: int) -> FeatureSelection:
    """The ``k`` highest-scoring teacher dimensions, best first."""
    if k > scores.numel():
        raise ValueError(f"cannot select {k} of {scores.numel()} dims")
    return FeatureSelection(dims=torch.argsort(scores, descending=True)[:k], scores=scores)


def select_random_dims(d_teacher: int, k: int, generator: torch.Generator) -> FeatureSelection:
    """The control: ``k`` teacher dimensions chosen uniformly at random."""
    return FeatureSelection(dims=torch.randperm(d_teacher, generator=generator)[:k])


def teacher_directions(
    layer: nn.Module, batches: Iterable[Any], task_loss: TaskLoss, k: int
) -> FeatureSelection:
    """The "directions" variant: top-k eigenvectors of sum g g^T, g = dL/dh_T."""
    total = None
    for _act, grad, mask in _collect(layer, batches, task_loss):
        m = gradient_second_moment(grad.double(), mask)
        total = m if total is None else total + m
    if total is None:
        raise ValueError("no batches")
    return FeatureSelection(basis=top_directions(total, k).float())


def pearson_loss(
    student_feats: torch.Tensor, teacher_feats: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """mean_j (1 - corr_j), corr over rows (N, k): invariant to per-dim scale and shift."""
    s = student_feats - student_feats.mean(0, keepdim=True)
    t = teacher_feats - teacher_feats.mean(0, keepdim=True)
    cov = (s * t).mean(0)
    corr = cov / ((s.square().mean(0) + eps).sqrt() * (t.square().mean(0) + eps).sqrt())
    return (1.0 - corr).mean()


class LinearProjector(nn.Module):
    """Baseline: learned map from the student's hidden size to the teacher's."""

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__()
        self.proj = nn.Linear(d_student, d_teacher)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def task_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over supervised positions (labels aligned with logits)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return masked_mean(ce, mask.reshape(-1))


def feature_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    selection: FeatureSelection | None = None,
    projector: LinearProjector | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Correlation loss on the selected teacher features, or projector MSE to the full state."""
    keep = mask.bool()
    hs, ht = student_hidden[keep], teacher_hidden[keep]
    if projector is not None:
        return F.mse_loss(projector(hs), ht)
    if selection is None:
        return student_hidden.new_zeros(())
    if selection.size != hs.shape[-1]:
        raise ValueError(f"selection has {selection.size} features, student {hs.shape[-1]}")
    return pearson_loss(hs, selection.project(ht), eps)


def flexkd_loss(
    student_logits: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    cfg: FlexKDConfig,
    *,
    selection: FeatureSelection | None = None,
    projector: LinearProjector | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_task + alpha * L_logitKD + beta * L_feat on the supervised positions.

    Pass ``selection`` for Flex-KD (or the random / directions variants), ``projector`` for
    the projector baseline, neither for logit KD only. Returns the loss and its parts.
    """
    l_task = task_ce(student_logits, labels, mask)
    l_kd = masked_divergence(
        student_logits, teacher_logits.detach(), mask, cfg.divergence, temperature=cfg.temperature
    )
    l_feat = feature_loss(
        student_hidden,
        teacher_hidden.detach(),
        mask,
        selection=selection,
        projector=projector,
        eps=cfg.eps,
    )
    total = l_task + cfg.alpha * l_kd + cfg.beta * l_feat
    parts = {k: float(v.detach()) for k, v in (("task", l_task), ("kd", l_kd), ("feat", l_feat))}
    return total, parts
