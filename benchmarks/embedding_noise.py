"""Noise planted in the embeddings themselves, for kinds the caption grid never plants.

``ecif.data.noisy`` corrupts captions (shuffles, near-miss classes, one attribute, templates);
web-scale sets also fail on the image side and in ways no caption edit makes. These four
kinds corrupt a clean set's unit embeddings directly, so they apply to every geometry of
``bench_detect.py`` alike:

- ``placeholder``: the image is one of three "image not available" placeholders (a broken
  download), each shared by many pairs, with a tiny jitter;
- ``ood_image`` / ``ood_text``: the image (caption) is from another domain: a random direction
  inside the encoder's cone (the set's mean plus a spread like its own), not a far-off vector
  any cosine would catch;
- ``half_right``: the caption describes this image and another one (the two caption
  embeddings summed): partly right, the hardest of the four.
"""

from __future__ import annotations

import numpy as np

EMBEDDING_KINDS = ("placeholder", "ood_image", "ood_text", "half_right")


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _in_cone(side: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k unit vectors at the set's mean plus a random offset as long as its rows' own."""
    mean = side.mean(0)
    spread = np.linalg.norm(side - mean, axis=1).mean()
    return _unit(mean + spread * _unit(rng.standard_normal((k, side.shape[1]))))


def corrupt_embeddings(
    image: np.ndarray, text: np.ndarray, kind: str, rate: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, text, is_corrupted): a ``rate`` share of the rows corrupted by ``kind``."""
    if kind not in EMBEDDING_KINDS:
        raise ValueError(f"kind must be one of {EMBEDDING_KINDS}; got {kind!r}")
    rng = np.random.default_rng([seed, 31337])
    n, d = image.shape
    rows = np.sort(rng.choice(n, int(round(rate * n)), replace=False))
    x, y = np.array(image, dtype=np.float64), np.array(text, dtype=np.float64)
    if kind == "placeholder":
        ph = _in_cone(x, 3, rng)[rng.integers(0, 3, len(rows))]
        x[rows] = _unit(ph + 0.02 / np.sqrt(d) * rng.standard_normal((len(rows), d)))
    elif kind == "ood_image":
        x[rows] = _in_cone(x, len(rows), rng)
    elif kind == "ood_text":
        y[rows] = _in_cone(y, len(rows), rng)
    else:  # half_right
        other = rng.permutation(n)[: len(rows)]
        y[rows] = _unit(y[rows] + y[other])
    labels = np.zeros(n, dtype=bool)
    labels[rows] = True
    return x.astype(np.float32), y.astype(np.float32), labels
