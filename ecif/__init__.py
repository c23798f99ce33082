"""ecif: audit image-text (CLIP) datasets with ECIF, a closed-form contrastive influence function."""

from ecif.data import EmbeddingSet

__version__ = "0.1.0"

__all__ = ["EmbeddingSet", "__version__"]
