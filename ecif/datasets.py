"""Built-in data: shapes and digits pairs, synthetic concept and latent embeddings, the tiny CLIP, planted noise.

``shapes_embedded(noise=0.2)`` is the one-call demo input: it makes shapes shards, embeds them
through the real ``ecif.embed`` path with the cached tiny model and returns the folder, ready
for ``EmbeddingSet.load``. Nothing downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ecif.data.concepts import GEOMETRIES, concept_pairs
from ecif.data.digits import digits
from ecif.data.latent import LATENT_GEOMETRIES, latent_pairs
from ecif.data.layout import read_manifest
from ecif.data.noisy import NOISE_KINDS
from ecif.data.shapes import ShapesData, caption_of, shapes
from ecif.data.tiny_clip import (
    TINY_NAME,
    TinyClipReport,
    read_report,
    register_config,
    retrieval_accuracy,
    tiny_clip,
    tiny_config,
    train_tiny_clip,
)
from ecif.paths import cache_dir

if TYPE_CHECKING:
    from ecif.data.embedding_set import EmbeddingSet

__all__ = [
    "GEOMETRIES",
    "LATENT_GEOMETRIES",
    "NOISE_KINDS",
    "TINY_NAME",
    "ShapesData",
    "TinyClipReport",
    "cache_dir",
    "caption_of",
    "concept_pairs",
    "digits",
    "latent_pairs",
    "read_report",
    "register_config",
    "retrieval_accuracy",
    "shapes",
    "shapes_embedded",
    "shapes_sets",
    "tiny_clip",
    "tiny_config",
    "train_tiny_clip",
]


_DATA_VERSION = 3  # bump when shapes() output changes, so cached folders are remade


def shapes_embedded(
    n: int = 2000,
    noise: float = 0.2,
    seed: int = 0,
    *,
    noise_kind: str = "shuffle",
    model_dir: str | os.PathLike | None = None,
    shard_size: int = 500,
    folder: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = False,
) -> Path:
    """Path of an embedded shapes folder (clip-retrieval layout + manifest), made once and cached.

    ``model_dir``: a ``local-dir`` model folder; default the cached tiny CLIP (trained on first
    use, about a minute). The parquet shards that were embedded are in ``<folder>/../shards``.
    Metadata carries ``caption``, ``true_caption``, ``is_corrupted``, ``corrupted_attribute``
    and the shape attributes. ``noise_kind`` as in ``shapes`` ("shuffle" or "attribute").
    """
    from ecif.data.embed import embed

    model_dir = Path(model_dir) if model_dir else tiny_clip(progress=progress)
    if folder is None:
        parts = [n, noise, seed, shard_size, str(Path(model_dir).resolve())]
        key = json.dumps(parts + [noise_kind, _DATA_VERSION])
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        folder = cache_dir() / "datasets" / f"shapes-{digest}" / "emb"
    folder = Path(folder)
    man = read_manifest(folder) if folder.exists() else None
    if man and man.get("complete"):
        return folder
    shard_dir = folder.parent / "shards"
    if not (shard_dir / "00000.parquet").exists() or man is None:
        shapes(n, seed=seed, noise=noise, noise_kind=noise_kind).to_parquet(
            shard_dir, shard_size=shard_size
        )
    embed(shard_dir, folder, model=f"local-dir:{model_dir}", device=device, progress=progress)
    return folder


def shapes_sets(
    n: int = 2000,
    noise: float = 0.2,
    n_val: int = 500,
    seed: int = 0,
    *,
    noise_kind: str = "shuffle",
    model_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[EmbeddingSet, EmbeddingSet]:
    """(train, val) EmbeddingSets for a demo: ``n`` noisy shapes pairs and ``n_val`` clean,
    trusted pairs from another seed, both embedded with the tiny model and cached."""
    from ecif.data.embedding_set import EmbeddingSet

    kw = dict(model_dir=model_dir, progress=progress)
    train = shapes_embedded(n, noise, seed, noise_kind=noise_kind, **kw)
    val = shapes_embedded(n_val, 0.0, seed + 1_000_003, **kw)
    return EmbeddingSet.load(train), EmbeddingSet.load(val)


def rotated_pairs(
    n: int, d: int, noise: float = 0.2, seed: int = 0, rotation_seed: int = 123
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit image/text embeddings related by a fixed rotation, a fraction with shuffled text
    (the rows returned third): a small synthetic set where retraining is affordable."""
    rot = np.linalg.qr(np.random.default_rng(rotation_seed).standard_normal((d, d)))[0]
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x @ rot + 0.6 * g.standard_normal((n, d)) / np.sqrt(d)
    k = int(round(noise * n))
    bad = g.choice(n, k, replace=False) if k else np.zeros(0, dtype=int)
    y[bad] = y[np.roll(bad, 1)]
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x, y, bad


def clip_like_pairs(
    n: int,
    d: int,
    noise: float = 0.2,
    seed: int = 0,
    clusters: int = 200,
    rows_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit pairs shaped like CLIP's: each side a shared mean direction plus clustered content
    with a 1/k spectrum in its own basis (image and text related by a rotation), a fraction
    with shuffled text (the rows returned third). Anisotropic, unlike ``rotated_pairs``. The
    seed also draws the bases and means, so take a validation set from the same call (split
    the rows), or from the same seed with another ``rows_seed`` (same world, other rows)."""
    g = np.random.default_rng(seed)
    spec = np.sqrt(1.0 / np.arange(1, d + 1))
    bx, by, rot = (np.linalg.qr(g.standard_normal((d, d)))[0] for _ in range(3))
    mu_x, mu_y = (1.5 * v / np.linalg.norm(v) for v in g.standard_normal((2, d)))
    centres = g.standard_normal((clusters, d)) * spec
    if rows_seed is not None:  # same world (bases, means, clusters), other rows
        g = np.random.default_rng([seed, rows_seed])
    z = centres[g.integers(0, clusters, n)] + 0.3 * g.standard_normal((n, d)) * spec
    x = mu_x + z @ bx.T
    y = mu_y + (z @ rot.T + 0.3 * g.standard_normal((n, d)) * spec) @ by.T
    k = int(round(noise * n))
    bad = g.choice(n, k, replace=False) if k else np.zeros(0, dtype=int)
    y[bad] = y[np.roll(bad, 1)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x, y, bad
