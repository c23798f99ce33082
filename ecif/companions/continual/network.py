"""A growing MLP whose hidden units carry timestamps, so each task sees only its own units.

Every hidden unit has a ``birth`` task (the first task that uses it) and a ``death`` task (the
first task that no longer does; ``NEVER`` if still in use). Task ``s`` uses unit ``j`` iff
``birth[j] <= s < death[j]``. New units are always appended, so the units a finished task uses
keep their indices and order: its forward pass gathers exactly the same sub-matrices as before,
and a split that restores the old copy reproduces the old outputs bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEVER = 2**62


@dataclass
class HiddenLayer:
    """Rows are units: ``weight`` is (units, fan-in), one birth/death task index per unit."""

    weight: torch.Tensor
    bias: torch.Tensor
    birth: torch.Tensor
    death: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.weight.shape[0])


@dataclass
class Snapshot:
    """Copies of all hidden weights and heads, taken before a task is learned."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    heads: list[tuple[torch.Tensor, torch.Tensor]]


def _init_rows(n: int, fan_in: int, gen: torch.Generator | None) -> torch.Tensor:
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return (torch.rand(n, fan_in, generator=gen) * 2 - 1) * bound * math.sqrt(6.0)


class TimestampedMLP:
    """ReLU MLP with per-task linear heads and timestamped, growable hidden layers."""

    def __init__(
        self, in_dim: int, hidden: Sequence[int], generator: torch.Generator | None = None
    ):
        self.in_dim = in_dim
        self.layers: list[HiddenLayer] = []
        prev = in_dim
        for h in hidden:
            self.layers.append(
                HiddenLayer(
                    weight=_init_rows(h, prev, generator),
                    bias=torch.zeros(h),
                    birth=torch.zeros(h, dtype=torch.long),
                    death=torch.full((h,), NEVER, dtype=torch.long),
                )
            )
            prev = h
        self.heads: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ----------------------------------------------------------------- inspection
    @property
    def n_tasks(self) -> int:
        return len(self.heads)

    def alive(self, layer: int, task: int) -> torch.Tensor:
        """Indices (ascending) of the units of ``layer`` that task ``task`` uses."""
        lay = self.layers[layer]
        return torch.nonzero((lay.birth <= task) & (task < lay.death)).flatten()

    def unit_counts(self) -> list[int]:
        """Units stored per layer, dead old copies included (they still cost memory)."""
        return [lay.size for lay in self.layers]

    def n_params(self) -> int:
        """All stored weights and biases, heads included."""
        n = sum(lay.weight.numel() + lay.bias.numel() for lay in self.layers)
        return n + sum(w.numel() + b.numel() for w, b in self.heads)

    def n_nonzero(self) -> int:
        """Stored parameters that are not exactly zero (the L1 and group-lasso steps make zeros)."""
        n = sum(int((lay.weight != 0).sum() + (lay.bias != 0).sum()) for lay in self.layers)
        return n + sum(int((w != 0).sum() + (b != 0).sum()) for w, b in self.heads)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            weights=[lay.weight.detach().clone() for lay in self.layers],
            biases=[lay.bias.detach().clone() for lay in self.layers],
            heads=[(w.detach().clone(), b.detach().clone()) for w, b in self.heads],
        )

    def parameters(self, task: int) -> list[torch.Tensor]:
        """The tensors a phase of task ``task`` may train: hidden weights/biases, then its head."""
        out: list[torch.Tensor] = []
        for lay in self.layers:
            out += [lay.weight, lay.bias]
        return out + list(self.heads[task])

    # ----------------------------------------------------------------- forward
    def hidden(self, x: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last hidden activations for ``task`` and the indices of the units they come from."""
        h, prev = x, None
        for i, lay in enumerate(self.layers):
            idx = self.alive(i, task)
            w = lay.weight.index_select(0, idx)
            if prev is not None:
                w = w.index_select(1, prev)
            h = F.relu(F.linear(h, w, lay.bias.index_select(0, idx)))
            prev = idx
        return h, prev

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of task ``task``, computed from the units alive at that task only."""
        h, prev = self.hidden(x, task)
        hw, hb = self.heads[task]
        return F.linear(h, hw.index_select(1, prev), hb)

    __call__ = forward

    # ----------------------------------------------------------------- growth
    def add_head(self, n_classes: int, generator: torch.Generator | None = None) -> int:
        """New output head for the next task; returns its task index."""
        width = self.layers[-1].size
        n_alive = int(self.alive(len(self.layers) - 1, self.n_tasks).numel())
        w = _init_rows(n_classes, n_alive, generator) / math.sqrt(6.0)
        full = torch.zeros(n_classes, width)
        full[:, self.alive(len(self.layers) - 1, self.n_tasks)] = w
        self.heads.append((full, torch.zeros(n_classes)))
        return self.n_tasks - 1

    def _append_columns(
        self, layer: int, cols: torch.Tensor, head_cols: list[torch.Tensor]
    ) -> None:
        """Give the consumers of ``layer`` (next layer or every head) extra input columns."""
        if layer + 1 < len(self.layers):
            nxt = self.layers[layer + 1]
            nxt.weight = torch.cat([nxt.weight, cols], dim=1)
        else:
            self.heads = [(torch.cat([w, c], dim=1), b) for (w, b), c in zip(self.heads, head_cols)]

    def expand(
        self, layer: int, k: int, task: int, generator: torch.Generator | None = None
    ) -> None:
        """Append ``k`` units born at ``task``; their outgoing weights start at zero."""
        lay = self.layers[layer]
        fan_in = lay.weight.shape[1]
        n_alive_in = self.in_dim if layer == 0 else int(self.alive(layer - 1, task).numel())
        rows = _init_rows(k, fan_in, generator) * math.sqrt(fan_in / max(n_alive_in, 1))
        lay.weight = torch.cat([lay.weight, rows])
        lay.bias = torch.cat([lay.bias, torch.zeros(k)])
        lay.birth = torch.cat([lay.birth, torch.full((k,), task, dtype=torch.long)])
        lay.death = torch.cat([lay.death, torch.full((k,), NEVER, dtype=torch.long)])
        n_next = self.layers[layer + 1].size if layer + 1 < len(self.layers) else 0
        self._append_columns(
            layer, torch.zeros(n_next, k), [torch.zeros(w.shape[0], k) for w, _ in self.heads]
        )

    def remove_units(self, layer: int, units: Sequence[int], task: int) -> None:
        """Delete units born at ``task`` (pruning); older units are never removed."""
        lay = self.layers[layer]
        units_t = torch.as_tensor(list(units), dtype=torch.long)
        if units_t.numel() == 0:
            return
        if bool((lay.birth[units_t] != task).any()):
            raise ValueError("only units born at the current task can be removed")
        keep = torch.ones(lay.size, dtype=torch.bool)
        keep[units_t] = False
        lay.weight, lay.bias = lay.weight[keep], lay.bias[keep]
        lay.birth, lay.death = lay.birth[keep], lay.death[keep]
        if layer + 1 < len(self.layers):
            nxt = self.layers[layer + 1]
            nxt.weight = nxt.weight[:, keep]
        else:
            self.heads = [(w[:, keep], b) for w, b in self.heads]

    def split(self, layer: int, units: Sequence[int], task: int, snap: Snapshot) -> list[int]:
        """Duplicate drifted units: the old copy gets its pre-task weights back and retires at
        ``task``; the new copy (born at ``task``) keeps the trained weights.

        The consumers' column for the old copy is restored too and its trained values move to
        the new copy's column, so the old tasks see their pre-task unit and the current task
        computes exactly what it computed before the split. Returns the new copies' indices.
        """
        units = [int(u) for u in units]
        if not units:
            return []
        lay = self.layers[layer]
        old_w, old_b = snap.weights[layer], snap.biases[layer]
        n_old_rows, n_old_cols = old_w.shape
        if max(units) >= n_old_rows or bool((lay.birth[units] >= task).any()):
            raise ValueError("only units that existed before the task can be split")
        idx = torch.as_tensor(units, dtype=torch.long)
        new_rows, new_bias = lay.weight[idx].clone(), lay.bias[idx].clone()
        restored = torch.zeros_like(new_rows)
        restored[:, :n_old_cols] = old_w[idx]
        lay.weight = lay.weight.clone()
        lay.weight[idx] = restored
        lay.bias = lay.bias.clone()
        lay.bias[idx] = old_b[idx]
        lay.death = lay.death.clone()
        lay.death[idx] = task
        first_new = lay.size
        lay.weight = torch.cat([lay.weight, new_rows])
        lay.bias = torch.cat([lay.bias, new_bias])
        lay.birth = torch.cat([lay.birth, torch.full((len(units),), task, dtype=torch.long)])
        lay.death = torch.cat([lay.death, torch.full((len(units),), NEVER, dtype=torch.long)])

        if layer + 1 < len(self.layers):
            nxt = self.layers[layer + 1]
            cols = nxt.weight[:, idx].clone()
            w = nxt.weight.clone()
            old_cols = snap.weights[layer + 1][:, idx]
            w[:, idx] = 0.0
            w[: old_cols.shape[0], idx] = old_cols
            nxt.weight = torch.cat([w, cols], dim=1)
        else:
            heads = []
            for s, (w, b) in enumerate(self.heads):
                if s == task:
                    cols = w[:, idx].clone()
                    w = w.clone()
                    w[:, idx] = 0.0
                else:
                    cols = torch.zeros(w.shape[0], len(units))
                heads.append((torch.cat([w, cols], dim=1), b))
            self.heads = heads
        return list(range(first_new, first_new + len(units)))
