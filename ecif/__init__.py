"""ecif: audit image-text (CLIP) datasets with ECIF, a closed-form contrastive influence function."""

from ecif.api import (
    classification_gradient,
    fit,
    loss_gradient,
    relative_influence,
    score,
    self_influence,
    solver,
)
from ecif.data import EmbeddingSet
from ecif.engine.head import Head

__version__ = "0.1.0"

__all__ = [
    "EmbeddingSet",
    "Head",
    "__version__",
    "classification_gradient",
    "fit",
    "loss_gradient",
    "relative_influence",
    "score",
    "self_influence",
    "solver",
]
