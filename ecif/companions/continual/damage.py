"""Ground truth for drift criteria: how much one unit's drift actually hurts the old tasks.

The damage of unit j is the old-task loss now minus the old-task loss after putting back j's
pre-task incoming weights (and bias) alone. A good drift criterion ranks units by this damage;
the benchmark reports the Spearman correlation of each criterion with it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ecif.companions.continual.network import Snapshot, TimestampedMLP

TaskData = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def old_task_loss(net: TimestampedMLP, sets: Sequence[TaskData]) -> float:
    """Mean over tasks s of the cross-entropy of head s on ``sets[s]``."""
    losses = [float(F.cross_entropy(net(x, s), y)) for s, (x, y) in enumerate(sets)]
    return sum(losses) / len(losses)


@torch.no_grad()
def restore_damage(
    net: TimestampedMLP,
    snap: Snapshot,
    layer: int,
    units: torch.Tensor,
    sets: Sequence[TaskData],
) -> torch.Tensor:
    """Old-task loss reduction from restoring each of ``units`` (one at a time) to ``snap``.

    Positive means the unit's drift hurt the old tasks. ``sets`` holds one (x, y) per old task,
    in task order. The network is left exactly as it was.
    """
    base = old_task_loss(net, sets)
    lay = net.layers[layer]
    w_old, b_old = snap.weights[layer], snap.biases[layer]
    n_cols = w_old.shape[1]
    out = torch.empty(len(units), dtype=torch.float64)
    for i, j in enumerate(units.tolist()):
        row, bias = lay.weight[j, :n_cols].clone(), lay.bias[j].clone()
        lay.weight[j, :n_cols] = w_old[j]
        lay.bias[j] = b_old[j]
        out[i] = base - old_task_loss(net, sets)
        lay.weight[j, :n_cols] = row
        lay.bias[j] = bias
    return out


@torch.no_grad()
def split_gain(
    net: TimestampedMLP,
    snap: Snapshot,
    layer: int,
    units: torch.Tensor,
    sets: Sequence[TaskData],
    task: int,
) -> torch.Tensor:
    """Old-task loss reduction from splitting each of ``units`` alone at ``task``.

    Unlike :func:`restore_damage` this also restores the unit's column in its consumers, i.e.
    it is exactly what the split decision buys the old tasks. Works on copies of the network.
    """
    base = old_task_loss(net, sets)
    out = torch.empty(len(units), dtype=torch.float64)
    for i, j in enumerate(units.tolist()):
        trial = copy.deepcopy(net)
        trial.split(layer, [j], task, snap)
        out[i] = base - old_task_loss(trial, sets)
    return out


@torch.no_grad()
def rescale_damage(
    net: TimestampedMLP, layer: int, units: torch.Tensor, factor: float, sets: Sequence[TaskData]
) -> torch.Tensor:
    """Old-task loss increase from multiplying each unit's incoming weights and bias by
    ``factor`` > 0: a change that angular drift scores as exactly zero."""
    base = old_task_loss(net, sets)
    lay = net.layers[layer]
    out = torch.empty(len(units), dtype=torch.float64)
    for i, j in enumerate(units.tolist()):
        row, bias = lay.weight[j].clone(), lay.bias[j].clone()
        lay.weight[j] = row * factor
        lay.bias[j] = bias * factor
        out[i] = old_task_loss(net, sets) - base
        lay.weight[j] = row
        lay.bias[j] = bias
    return out
