"""Memory-less continual learning: a DEN-style learner with pluggable drift criteria.

Reconstructs "Effective prevention of semantic drift as angular distance in memory-less
continual deep neural networks" (Saadi & Khan, 2021) on top of Dynamically Expandable Networks
(Yoon et al., 2018): the split decision uses angular instead of Euclidean drift.
"""

from ecif.companions.continual.config import DENConfig
from ecif.companions.continual.damage import (
    old_task_loss,
    rescale_damage,
    restore_damage,
    split_gain,
)
from ecif.companions.continual.drift import DRIFT_CRITERIA, drift_scores
from ecif.companions.continual.learner import DENLearner, TaskReport, changed_units, incoming
from ecif.companions.continual.network import NEVER, Snapshot, TimestampedMLP
from ecif.companions.continual.tasks import (
    Task,
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
