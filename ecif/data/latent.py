"""Embeddings from a continuous latent: a geometry with no classes at all.

Every other synthetic geometry (``ecif.data.concepts``) draws pairs from 20 classes and a few
attributes, so every image has many near-copies and the nearest-neighbour consensus has a
class to vote on. Web pairs are closer to the opposite: nearly every pair is its own concept.
Here each pair has a latent vector z ~ N(0, I_k) (k = 24); its image embedding is the image
mean plus z through an image map plus anisotropic nuisance, its text embedding the text mean
plus z' through a text map that is only partly the image map (``alignment``) plus nuisance.
z' = z for a clean pair. The caption grid's noise kinds map onto the latent:

- ``shuffle``: z' is another pair's latent (a fresh draw);
- ``confusable``: z' = sqrt(0.6) z + sqrt(0.4) v, a nearby concept (latent cosine ~0.77);
- ``attribute``: a sixth of z's coordinates redrawn, the rest right;
- ``boilerplate``: z' is one of four template latents, shared by every such caption;
- ``mixed``: a quarter of each.

Geometries: ``latent_clip`` (matched cosine about 0.29, unmatched about 0.12, as CLIP on web
pairs), ``latent_aligned`` (matched about 0.72, unmatched about 0.15) and ``latent_cone`` (a
strong direction shared by all embeddings, the narrow cone of real CLIP spaces: matched
about 0.63, unmatched about 0.41). All are held out: no default was chosen on them
(benchmarks/README.md). Test data, like ``concepts``: nothing downloads.
"""

from __future__ import annotations

import numpy as np

from ecif.data.concepts import Geometry

LATENT_DIM = 24
LATENT_GEOMETRIES = {
    "latent_clip": Geometry(alignment=0.55, nuisance=0.6, mean=0.65),
    "latent_aligned": Geometry(alignment=0.9, nuisance=0.25, mean=0.5),
    "latent_cone": Geometry(alignment=0.75, nuisance=0.4, mean=1.2),
}
KIND_ORDER = ("shuffle", "confusable", "attribute", "boilerplate")  # ``mixed``: a quarter each
TEMPLATES = 4


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


class LatentWorld:
    """The maps, means, nuisance spectrum and templates of one world (``seed``)."""

    def __init__(self, d: int, geo: Geometry, seed: int = 0, k: int = LATENT_DIM):
        g = np.random.default_rng([seed, 5])
        self.image_map = g.standard_normal((k, d)) / np.sqrt(k * d)
        other = g.standard_normal((k, d)) / np.sqrt(k * d)
        self.text_map = geo.alignment * self.image_map + np.sqrt(1 - geo.alignment**2) * other
        shared = _unit(g.standard_normal((1, d)))
        self.mean_x = geo.mean * _unit(shared + 0.35 * _unit(g.standard_normal((1, d))))
        self.mean_y = geo.mean * _unit(shared + 0.35 * _unit(g.standard_normal((1, d))))
        self.spectrum = np.sqrt(1.0 / np.arange(1, d + 1)) * geo.nuisance
        self.basis = np.linalg.qr(g.standard_normal((d, d)))[0]
        self.templates = g.standard_normal((TEMPLATES, k))
        self.k, self.d = k, d

    def nuisance(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return (rng.standard_normal((n, self.d)) * self.spectrum) @ self.basis.T

    def pairs(
        self, n: int, noise: float, kind: str, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image, text, is_corrupted): ``n`` unit float32 pairs, a ``noise`` share of them
        corrupted by ``kind``."""
        if kind not in KIND_ORDER + ("mixed",):
            raise ValueError(f"kind must be one of {KIND_ORDER + ('mixed',)}; got {kind!r}")
        z = rng.standard_normal((n, self.k))
        zt = z.copy()
        bad = rng.choice(n, int(round(noise * n)), replace=False)
        for j, i in enumerate(bad):
            which = KIND_ORDER[j % len(KIND_ORDER)] if kind == "mixed" else kind
            if which == "shuffle":
                zt[i] = rng.standard_normal(self.k)
            elif which == "confusable":
                zt[i] = np.sqrt(0.6) * z[i] + np.sqrt(0.4) * rng.standard_normal(self.k)
            elif which == "attribute":
                cols = rng.choice(self.k, max(1, self.k // 6), replace=False)
                zt[i, cols] = rng.standard_normal(len(cols))
            else:
                zt[i] = self.templates[rng.integers(TEMPLATES)]
        x = _unit(self.mean_x + z @ self.image_map + self.nuisance(rng, n))
        y = _unit(self.mean_y + zt @ self.text_map + self.nuisance(rng, n))
        corrupted = np.zeros(n, dtype=bool)
        corrupted[bad] = True
        return x.astype(np.float32), y.astype(np.float32), corrupted


def latent_pairs(
    geometry: str, kind: str, noise: float, seed: int, n: int, d: int = 64, world_seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, text, is_corrupted) from one ``LATENT_GEOMETRIES`` world (``world_seed``; keep
    it to draw training and validation sets from the same world); ``seed`` draws the rows."""
    if geometry not in LATENT_GEOMETRIES:
        raise ValueError(f"geometry must be one of {tuple(LATENT_GEOMETRIES)}; got {geometry!r}")
    world = LatentWorld(d, LATENT_GEOMETRIES[geometry], world_seed)
    return world.pairs(n, noise, kind, np.random.default_rng([world_seed, seed]))
