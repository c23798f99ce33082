"""ecif: audit image-text (CLIP) datasets with ECIF, a closed-form contrastive influence function."""

from ecif import datasets  # noqa: F401  (ecif.datasets.shapes(...) after import ecif)
from ecif._version import __version__
from ecif.api import (
    ClusterRows,
    FitArgs,
    SolverArgs,
    classification_gradient,
    fit,
    loss_gradient,
    relative_influence,
    score,
    self_influence,
    solver,
)
from ecif.audit import AuditArgs, Auditor
from ecif.audit.shards import score_shards
from ecif.audit.trace_args import TraceArgs
from ecif.audit.validation_noise import NoisyValidationWarning
from ecif.data import EmbeddingSet
from ecif.data.embed import embed
from ecif.engine.head import Head
from ecif.engine.warning_types import ConvergenceWarning, UnreliableInfluenceWarning

__all__ = [
    "AuditArgs",
    "ClusterRows",
    "Auditor",
    "ConvergenceWarning",
    "EmbeddingSet",
    "FitArgs",
    "Head",
    "NoisyValidationWarning",
    "SolverArgs",
    "TraceArgs",
    "UnreliableInfluenceWarning",
    "__version__",
    "classification_gradient",
    "datasets",
    "embed",
    "fit",
    "loss_gradient",
    "relative_influence",
    "score",
    "score_shards",
    "self_influence",
    "solver",
]
