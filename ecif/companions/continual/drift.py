"""Drift criteria: how far a unit's incoming weights moved while learning a new task.

DEN decides which units to duplicate by the Euclidean norm of the change; the angular variant
(Saadi & Khan, 2021) uses arccos(cos(w_old, w_new)) / pi instead, which ignores the scale of the
weights. ``random`` is the control that any criterion has to beat, and ``scale`` (|log of the norm
ratio|) is a diagnostic for exactly what the angle cannot see: a positive rescaling of a ReLU unit
changes its output by that factor but leaves the angle at zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ecif.grad.distances import angular_distance, euclidean_distance, log_norm_ratio

DriftFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], torch.Tensor]


def _euclidean(old: torch.Tensor, new: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return euclidean_distance(old, new, dim=-1)


def _angular(old: torch.Tensor, new: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return angular_distance(old, new, dim=-1)


def _random(old: torch.Tensor, new: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(old.shape[0], generator=gen, dtype=old.dtype)


def _scale(old: torch.Tensor, new: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return log_norm_ratio(old, new, dim=-1)


DRIFT_CRITERIA: dict[str, DriftFn] = {
    "euclidean": _euclidean,
    "angular": _angular,
    "random": _random,
    "scale": _scale,
}


def drift_scores(
    old: torch.Tensor,
    new: torch.Tensor,
    criterion: str | DriftFn = "euclidean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-unit drift between rows of ``old`` and ``new`` (units x fan-in).

    ``criterion`` is a name from :data:`DRIFT_CRITERIA` or any callable with the same signature,
    so a new criterion plugs in without touching the learner.
    """
    if old.shape != new.shape:
        raise ValueError(f"old {tuple(old.shape)} and new {tuple(new.shape)} differ in shape")
    fn = DRIFT_CRITERIA[criterion] if isinstance(criterion, str) else criterion
    if old.shape[0] == 0:
        return old.new_zeros(0)
    return fn(old, new, generator)
