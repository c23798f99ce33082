"""Memory-less continual learning: a DEN-style learner with pluggable drift criteria.

Reconstructs "Effective prevention of semantic drift as angular distance in memory-less
continual deep neural networks" (Saadi & Khan, 2021) on top of Dynamically Expandable Networks
(Yoon et al., 2018): the split decision uses angular instead of Euclidean drift.

    from ecif.companions.continual import DENConfig, DENLearner, digits_xy, permuted_tasks

    tasks = permuted_tasks(*digits_xy(), n_tasks=5, seed=0)
    learner = DENLearner(64, DENConfig(hidden=(100, 50), drift="angular", split_top_m=5))
    for t, task in enumerate(tasks):
        report = learner.learn_task(task.x_train, task.y_train, task.n_classes)
    acc, loss = learner.evaluate(tasks[0].x_test, tasks[0].y_test, task=0)

Old tasks are evaluated with the units that existed when they were learned (timestamps);
a split gives them back their exact pre-split outputs for the split units.
"""

from ecif.companions.continual.config import DENConfig
from ecif.companions.continual.damage import (
    old_task_loss,
    rescale_damage,
    restore_damage,
    split_gain,
)
from ecif.companions.continual.drift import DRIFT_CRITERIA, drift_scores
from ecif.companions.continual.learner import (
    DENLearner,
    TaskReport,
    changed_units,
    choose_splits,
    incoming,
)
from ecif.companions.continual.network import NEVER, Snapshot, TimestampedMLP
from ecif.companions.continual.tasks import (
    Task,
    digits28_xy,
    digits_xy,
    permuted_tasks,
    split_tasks,
    synthetic_xy,
)

__all__ = [
    "DENConfig",
    "DENLearner",
    "DRIFT_CRITERIA",
    "NEVER",
    "Snapshot",
    "Task",
    "TaskReport",
    "TimestampedMLP",
    "changed_units",
    "choose_splits",
    "digits28_xy",
    "digits_xy",
    "drift_scores",
    "incoming",
    "old_task_loss",
    "permuted_tasks",
    "rescale_damage",
    "restore_damage",
    "split_gain",
    "split_tasks",
    "synthetic_xy",
]
