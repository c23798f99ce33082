"""Data layer: embedding sets, shards, formats on disk, the embedded demo data."""

from ecif.data.embedding_set import EmbeddingSet

__all__ = ["EmbeddingSet"]
