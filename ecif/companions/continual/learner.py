"""DEN-style continual learner: selective retraining, dynamic expansion, split/duplication.

No replay memory: when task t arrives only its own data is seen. Old tasks are protected by the
L2 pull (units that stay shared) and by splitting drifted units (their old copy is restored and
used by old tasks only, see :mod:`.network`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ecif.companions.continual.config import SPLIT_PICKS, DENConfig
from ecif.companions.continual.drift import drift_scores
from ecif.companions.continual.network import Snapshot, TimestampedMLP


@dataclass
class TaskReport:
    """What happened while learning one task (per-layer lists, bottom layer first)."""

    task: int
    selected: list[int] = field(default_factory=list)
    loss_after_selective: float | None = None
    expanded: list[int] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)
    candidates: list[torch.Tensor] = field(default_factory=list)
    drift: list[torch.Tensor] = field(default_factory=list)
    split: list[list[int]] = field(default_factory=list)
    final_loss: float = float("nan")


@dataclass
class _Phase:
    """Trainable entries (0/1 masks aligned with ``TimestampedMLP.parameters``) of one phase."""

    masks: list[torch.Tensor | None]
    pull_ref: list[torch.Tensor | None] | None = None
    group_rows: list[torch.Tensor | None] | None = None


BeforeSplit = Callable[["DENLearner", int, Snapshot, TaskReport], None]


def changed_units(net: TimestampedMLP, snap: Snapshot, layer: int, task: int) -> torch.Tensor:
    """Units that existed before ``task``, are used by it, and whose old weights moved."""
    w_old, b_old = snap.weights[layer], snap.biases[layer]
    n_rows, n_cols = w_old.shape
    alive = net.alive(layer, task)
    alive = alive[alive < n_rows]
    lay = net.layers[layer]
    moved = (lay.weight[alive, :n_cols] != w_old[alive]).any(1) | (lay.bias[alive] != b_old[alive])
    return alive[moved]


def incoming(
    net: TimestampedMLP, snap: Snapshot, layer: int, units: torch.Tensor, include_bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Old and current incoming weight vectors of ``units`` over the pre-task inputs."""
    w_old = snap.weights[layer]
    lay = net.layers[layer]
    old, new = w_old[units], lay.weight[units, : w_old.shape[1]]
    if include_bias:
        old = torch.cat([old, snap.biases[layer][units, None]], 1)
        new = torch.cat([new, lay.bias[units, None]], 1)
    return old, new


def choose_splits(
    scores: torch.Tensor,
    top_m: int | None,
    threshold: float,
    cap: int | None,
    pick: str = "most",
) -> torch.Tensor:
    """Positions (into ``scores``) of the units to split, in the order they were picked.

    With ``top_m``: the m most (``pick="most"``) or least drifted units, whatever their drift,
    so that criteria split the same number of units. Without: only units with drift strictly
    over ``threshold``, at most ``cap``; when more are over it, ``"most"`` takes the most
    drifted and ``"least"`` the least drifted, which is what DEN's public code does. Ties keep
    candidate order.
    """
    if pick not in SPLIT_PICKS:
        raise ValueError(f"pick must be 'most' or 'least', not {pick!r}")
    order = torch.argsort(scores, descending=pick == "most", stable=True)
    if top_m is not None:
        return order[:top_m]
    over = order[scores[order] > threshold]
    return over if cap is None else over[:cap]


class DENLearner:
    """Learns a sequence of classification tasks with one head each; see :class:`DENConfig`."""

    def __init__(self, in_dim: int, config: DENConfig | None = None):
        self.config = config or DENConfig()
        self.gen = torch.Generator().manual_seed(self.config.seed)
        self.net = TimestampedMLP(in_dim, self.config.hidden, generator=self.gen)
        self.reports: list[TaskReport] = []

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.net(x, task)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, task: int) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of task ``task`` on ``(x, y)``."""
        logits = self.net(x, task)
        acc = float((logits.argmax(1) == y).float().mean())
        return acc, float(F.cross_entropy(logits, y))

    # ----------------------------------------------------------------- training
    def _train(self, task: int, x: torch.Tensor, y: torch.Tensor, phase: _Phase, steps: int):
        cfg = self.config
        params = self.net.parameters(task)
        live = [i for i, m in enumerate(phase.masks) if m is not None and bool(m.any())]
        if not live or steps <= 0:
            return
        frozen = [params[i].detach().clone() for i in live]
        for i in live:
            params[i].requires_grad_(True)
        opt = torch.optim.Adam([params[i] for i in live], lr=cfg.lr)
        n = x.shape[0]
        for _ in range(steps):
            idx = torch.randperm(n, generator=self.gen)[: cfg.batch_size]
            loss = F.cross_entropy(self.net(x[idx], task), y[idx])
            for i in live:
                p, m = params[i], phase.masks[i]
                loss = loss + 0.5 * cfg.l2 * (p * m).pow(2).sum()
                ref = phase.pull_ref[i] if phase.pull_ref is not None else None
                if ref is not None and cfg.pull > 0:
                    sl = tuple(slice(0, s) for s in ref.shape)
                    loss = loss + 0.5 * cfg.pull * ((p[sl] - ref) * m[sl]).pow(2).sum()
            opt.zero_grad(set_to_none=False)
            loss.backward()
            for i in live:
                params[i].grad.mul_(phase.masks[i])
            opt.step()
            with torch.no_grad():
                for j, i in enumerate(live):
                    p, m = params[i], phase.masks[i] > 0
                    if cfg.l1 > 0:
                        p.copy_(torch.where(m, p.sign() * (p.abs() - cfg.l1).clamp_min(0), p))
                    rows = phase.group_rows[i] if phase.group_rows is not None else None
                    if rows is not None and rows.numel() and cfg.group_lasso > 0:
                        g = p[rows].norm(dim=1, keepdim=True)
                        shrink = (1 - cfg.group_lasso / g.clamp_min(1e-30)).clamp_min(0)
                        p[rows] = p[rows] * shrink
                    p.copy_(torch.where(m, p, frozen[j]))
        for i in live:
            params[i].requires_grad_(False)
            params[i].grad = None

    def _masks(self, task: int) -> list[torch.Tensor | None]:
        return [None for _ in self.net.parameters(task)]

    @torch.no_grad()
    def _full_loss(self, x: torch.Tensor, y: torch.Tensor, task: int) -> float:
        return float(F.cross_entropy(self.net(x, task), y))

    def _select(self, task: int) -> list[torch.Tensor]:
        """Units connected to the new head through non-zero weights (top-down, as in DEN)."""
        tol = self.config.connect_tol
        n_layers = len(self.net.layers)
        sel: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * n_layers
        top = self.net.alive(n_layers - 1, task)
        hw = self.net.heads[task][0]
        sel[-1] = top[(hw[:, top].abs() > tol).any(0)]
        for layer in range(n_layers - 2, -1, -1):
            alive = self.net.alive(layer, task)
            w_up = self.net.layers[layer + 1].weight[sel[layer + 1]][:, alive]
            sel[layer] = alive[(w_up.abs() > tol).any(0)]
        return sel

    def _selective_phase(self, task: int, sel: list[torch.Tensor], snap: Snapshot) -> _Phase:
        masks: list[torch.Tensor | None] = []
        pull: list[torch.Tensor | None] = []
        for layer, lay in enumerate(self.net.layers):
            rows = torch.zeros(lay.size, 1)
            rows[sel[layer]] = 1.0
            if layer == 0:
                cols = torch.ones(1, lay.weight.shape[1])
            else:
                cols = torch.zeros(1, lay.weight.shape[1])
                cols[0, sel[layer - 1]] = 1.0
            masks += [rows * cols, rows[:, 0].clone()]
            pull += [snap.weights[layer], snap.biases[layer]]
        hw, hb = self.net.heads[task]
        hmask = torch.zeros_like(hw)
        hmask[:, sel[-1]] = 1.0
        return _Phase(masks + [hmask, torch.ones_like(hb)], pull + [None, None])

    def _born_phase(self, task: int, with_groups: bool) -> _Phase:
        """Train only what is born at ``task`` (new units, new copies) and the new head."""
        masks: list[torch.Tensor | None] = []
        groups: list[torch.Tensor | None] = []
        for layer, lay in enumerate(self.net.layers):
            born = (lay.birth == task).float()
            wmask = born[:, None].expand_as(lay.weight).clone()
            if layer > 0:
                prev_born = (self.net.layers[layer - 1].birth == task).float()
                wmask = torch.maximum(wmask, prev_born[None, :].expand_as(wmask))
            masks += [wmask, born]
            groups += [torch.nonzero(born).flatten() if with_groups else None, None]
        hw, hb = self.net.heads[task]
        return _Phase(
            masks + [torch.ones_like(hw), torch.ones_like(hb)], None, groups + [None, None]
        )

    def _expand_and_prune(self, task: int, x: torch.Tensor, y: torch.Tensor, rep: TaskReport):
        cfg = self.config
        for layer in range(len(self.net.layers)):
            self.net.expand(layer, cfg.expand_k, task, self.gen)
        rep.expanded = [cfg.expand_k] * len(self.net.layers)
        self._train(task, x, y, self._born_phase(task, with_groups=True), cfg.steps)
        rep.pruned = []
        for layer, lay in enumerate(self.net.layers):
            new = torch.nonzero(lay.birth == task).flatten()
            dead_in = (lay.weight[new] == 0).all(1)
            if layer + 1 < len(self.net.layers):
                nxt = self.net.layers[layer + 1]
                out = nxt.weight[self.net.alive(layer + 1, task)][:, new]
            else:
                out = self.net.heads[task][0][:, new]
            dead_out = (out == 0).all(0)
            useless = new[dead_in | dead_out].tolist()
            self.net.remove_units(layer, useless, task)
            rep.pruned.append(len(useless))

    def _choose_splits(self, scores: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return choose_splits(
            scores, cfg.split_top_m, cfg.split_threshold, cfg.max_split_per_layer, cfg.split_pick
        )

    def _split(self, task: int, snap: Snapshot, rep: TaskReport, before: BeforeSplit | None):
        cfg = self.config
        for layer in range(len(self.net.layers)):
            cand = changed_units(self.net, snap, layer, task)
            old, new = incoming(self.net, snap, layer, cand, cfg.drift_include_bias)
            rep.candidates.append(cand)
            rep.drift.append(drift_scores(old, new, cfg.drift, self.gen))
        if before is not None:
            before(self, task, snap, rep)
        for layer in range(len(self.net.layers)):
            chosen = rep.candidates[layer][self._choose_splits(rep.drift[layer])]
            self.net.split(layer, sorted(chosen.tolist()), task, snap)
            rep.split.append(sorted(chosen.tolist()))

    def learn_task(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        n_classes: int | None = None,
        before_split: BeforeSplit | None = None,
    ) -> TaskReport:
        """Learn the next task from its training data only; returns a :class:`TaskReport`.

        ``before_split`` is called after training and before any split, with the pre-task
        snapshot, so a caller can measure drift and damage on the unsplit network.
        """
        cfg = self.config
        n_classes = n_classes or int(y.max()) + 1
        task = self.net.add_head(n_classes, self.gen)
        rep = TaskReport(task=task)
        if task == 0:
            all_on = [torch.ones_like(p) for p in self.net.parameters(0)]
            self._train(0, x, y, _Phase(all_on), cfg.steps)
        else:
            snap = self.net.snapshot()
            head_only = self._masks(task)
            head_only[-2:] = [torch.ones_like(p) for p in self.net.heads[task]]
            self._train(task, x, y, _Phase(head_only), cfg.n_head_steps)
            sel = self._select(task)
            rep.selected = [int(s.numel()) for s in sel]
            self._train(task, x, y, self._selective_phase(task, sel, snap), cfg.steps)
            rep.loss_after_selective = self._full_loss(x, y, task)
            if rep.loss_after_selective > cfg.loss_threshold and cfg.expand_k > 0:
                self._expand_and_prune(task, x, y, rep)
            self._split(task, snap, rep, before_split)
            if any(rep.split):
                phase = self._born_phase(task, with_groups=False)
                self._train(task, x, y, phase, cfg.n_split_retrain_steps)
        rep.final_loss = self._full_loss(x, y, task)
        self.reports.append(rep)
        return rep
