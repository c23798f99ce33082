"""``knn_disagreement``, the LEMoN-style kNN consensus: every head-mode audit's fifth signal,
and every model-mode audit's with a validation set.

It reads only the embeddings. Without a validation set it moved mean AP by +0.044 and
+0.017 on sets with five captions an image (an image's other captions are its nearest
neighbours' captions, so the consensus asks whether a caption agrees with the other
captions of its own photo), +0.007 and +0.010 where large heads cross-fit, and -0.001 to
+0.001 where small heads use self-influence, with one loss there: aligned mixed noise at 10%,
-0.016, where a fourth dimension blurs the two-Gaussian mixture's split
(benchmarks/README.md, "The consensus without a validation set").
"""

from __future__ import annotations

import numpy as np

from ecif.audit.baselines import KnnConsensus
from ecif.data.embedding_set import EmbeddingSet
from ecif.device import resolve_device


def consensus(
    data: EmbeddingSet, device: str = "auto", progress: bool = False
) -> tuple[np.ndarray, KnnConsensus]:
    """``knn_disagreement``: the consensus of each pair over the whole set
    (``baselines.KnnConsensus``; larger = its caption disagrees with its image's neighbours'
    and the other way round), and the indexes it read (a sampled twin's probes query them:
    ``probes.sampled_consensus``)."""
    near = KnnConsensus(data.image, data.text, device=resolve_device(device), progress=progress)
    return near.of_rows(), near
