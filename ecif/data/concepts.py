"""Synthetic embeddings built from captioned concepts, shaped like a pretrained CLIP's.

Each pair has a class (classes come in confusable pairs), a colour, a count and a position.
Its image embedding is a shared mean direction plus the image-side vectors of its concepts
plus anisotropic nuisance; its text embedding is the text-side mean plus the text-side
vectors of the concepts its caption names. The text-side vector of a concept is only partly
the image-side one (``alignment``), so the raw cosine knows the concepts partly, as a
pretrained model knows a new domain partly. Because text comes from the caption's concepts,
every kind of planted noise in ``ecif.data.noisy`` applies, boilerplate included.

Geometries (``GEOMETRIES``): ``clip_like`` (matched cosine about 0.3, unmatched 0.1-0.15, as
CLIP ViT-B/32 on web pairs), ``aligned`` (an encoder that knows the domain well: matched
about 0.7), and two kept out of every choice of the audit's defaults, to check them on shapes
they were not chosen on: ``cone`` (a strong direction shared by all embeddings, the narrow
cone of real CLIP spaces: matched about 0.65, unmatched about 0.38) and ``weak`` (an encoder
that barely knows the domain: matched about 0.2, unmatched about 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ecif.data.noisy import BOILERPLATE, AttributeSpace, caption_texts, plant_noise

CLASSES = tuple(f"object{k:02d}" for k in range(20))  # confusable in pairs: 00/01, 02/03, ...
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
COUNTS = ("one", "two", "three", "many")
POSITIONS = ("left", "right", "top", "bottom")
SPACE = AttributeSpace(
    class_col="object",
    confusable={c: (CLASSES[k ^ 1],) for k, c in enumerate(CLASSES)},
    values={"object": CLASSES, "colour": COLOURS, "count": COUNTS, "position": POSITIONS},
)
WEIGHTS = {"object": 1.0, "colour": 0.6, "count": 0.45, "position": 0.45}


@dataclass(frozen=True)
class Geometry:
    alignment: float  # cosine between a concept's image-side and text-side vectors
    nuisance: float  # scale of the image-side and text-side noise (1/k spectrum)
    mean: float  # length of the shared mean direction (sets the unmatched cosine)


GEOMETRIES = {
    "clip_like": Geometry(alignment=0.55, nuisance=1.6, mean=0.7),
    "aligned": Geometry(alignment=0.9, nuisance=0.8, mean=0.5),
    "cone": Geometry(alignment=0.75, nuisance=1.0, mean=1.2),
    "weak": Geometry(alignment=0.35, nuisance=2.0, mean=0.7),
}
HELD_OUT = ("cone", "weak")  # measured only after the defaults were fixed (benchmarks/README.md)


def concept_caption(row: dict) -> str:
    return f"{row['count']} {row['colour']} {row['object']} on the {row['position']}"


def concept_pairs(
    n: int,
    d: int = 64,
    noise: float = 0.0,
    noise_kind: str = "shuffle",
    seed: int = 0,
    geometry: str = "clip_like",
    world_seed: int = 0,
    class_skew: float = 0.0,
    captions_per_image: int = 1,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(image, text, frame): ``n`` unit float32 pairs and a frame with ``key``, ``caption``,
    ``true_caption``, ``is_corrupted``, ``corrupted_attribute`` and the concepts. The
    ``world_seed`` draws the concept vectors (keep it to draw train and validation sets from
    the same world); ``seed`` draws the rows and the noise. ``class_skew`` > 0: classes are
    long-tailed, as on the web (``class_frequencies``); 0: every class equally often.
    ``captions_per_image`` k > 1: each image (the same embedding) is k consecutive rows with
    k captions of its own (as COCO's five), each drawn, and corrupted, on its own."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {tuple(GEOMETRIES)}; got {geometry!r}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1; got {captions_per_image}")
    geo = GEOMETRIES[geometry]
    world = _World(d, geo, world_seed)
    rng = np.random.default_rng([world_seed, seed])
    k = int(captions_per_image)
    images = -(-n // k)
    attrs = pd.DataFrame({c: rng.choice(v, images) for c, v in SPACE.values.items()})
    if class_skew > 0:
        objects = np.asarray(SPACE.values["object"])
        attrs["object"] = rng.choice(objects, images, p=class_frequencies(class_skew, world_seed))
    x = None
    if k > 1:  # one image row each, then its k caption rows
        x = world.mean_x + world.concepts("x", attrs) + world.nuisance(rng, images)
        x = np.repeat(x, k, axis=0)[:n]
        attrs = attrs.loc[attrs.index.repeat(k)].reset_index(drop=True).iloc[:n]
    caps, corrupted, kinds = plant_noise(attrs, SPACE, noise, noise_kind, seed + 7919)
    if x is None:
        x = world.mean_x + world.concepts("x", attrs) + world.nuisance(rng, n)
    y = world.mean_y + world.concepts("y", caps) + world.nuisance(rng, n)
    bp = caps["boilerplate"].to_numpy()
    y[bp >= 0] = world.mean_y + world.templates[bp[bp >= 0]] + world.nuisance(rng, 1) * 0.3
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    frame = attrs.copy()
    frame.insert(0, "key", [f"concepts-{seed}-{i:06d}" for i in range(n)])
    frame.insert(1, "caption", caption_texts(caps, concept_caption))
    frame.insert(2, "true_caption", [concept_caption(r) for r in attrs.to_dict("records")])
    frame["is_corrupted"] = corrupted
    frame["corrupted_attribute"] = kinds
    return x.astype(np.float32), y.astype(np.float32), frame


def class_caption_pairs(
    n: int,
    classes: int = 4,
    noise: float = 0.0,
    seed: int = 0,
    geometry: str = "clip_like",
    d: int = 64,
    world_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(image, text, frame): ``n`` pairs of a classification set captioned by its label
    alone ("a photo of a {class}"), as sets converted from labelled images are: every image
    of a class shares one text embedding (the class's text-side vector), so captions repeat
    exactly. The first ``classes`` of ``CLASSES`` (they come in confusable pairs); images as
    ``concept_pairs`` draws them; ``noise``: that share of labels (exactly) flipped to
    another class, uniformly. Frame: ``key``, ``caption``, ``true_caption``, ``is_corrupted``."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {tuple(GEOMETRIES)}; got {geometry!r}")
    if not 2 <= classes <= len(CLASSES):
        raise ValueError(f"classes must be in 2..{len(CLASSES)}; got {classes}")
    world = _World(d, GEOMETRIES[geometry], world_seed)
    rng = np.random.default_rng([world_seed, seed, 31])
    names = CLASSES[:classes]
    attrs = pd.DataFrame({c: rng.choice(v, n) for c, v in SPACE.values.items()})
    attrs["object"] = rng.choice(names, n)
    x = world.mean_x + world.concepts("x", attrs) + world.nuisance(rng, n)
    label = attrs["object"].to_numpy().copy()
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, int(round(noise * n)), replace=False)] = True
    for i in np.flatnonzero(flipped):
        label[i] = rng.choice([c for c in names if c != label[i]])
    text = {c: _unit(world.mean_y + world.vec["y"][c]) for c in names}
    y = np.stack([text[c] for c in label])
    frame = pd.DataFrame(
        {
            "key": [f"classes-{seed}-{i:06d}" for i in range(n)],
            "caption": [f"a photo of a {c}" for c in label],
            "true_caption": [f"a photo of a {c}" for c in attrs["object"]],
            "is_corrupted": flipped,
        }
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.float32), frame


def class_frequencies(skew: float, world_seed: int = 0) -> np.ndarray:
    """How often each of ``CLASSES`` occurs under a long tail: the class of rank r (a
    permutation drawn by ``world_seed``, so confusable twins need not be equally common) has
    probability proportional to r ** -skew (Zipf)."""
    rank = np.random.default_rng([world_seed, 4421]).permutation(len(CLASSES)) + 1
    p = rank.astype(np.float64) ** -float(skew)
    return p / p.sum()


class _World:
    """The concept vectors of one world: image side, text side, means, boilerplate."""

    def __init__(self, d: int, geo: Geometry, seed: int):
        g = np.random.default_rng([seed, 991])
        self.d, self.geo = d, geo
        self.spec = np.sqrt(1.0 / np.arange(1, d + 1))
        self.basis = np.linalg.qr(g.standard_normal((d, d)))[0]
        shared = _unit(g.standard_normal(d))
        self.mean_x = geo.mean * _unit(shared + 0.35 * _unit(g.standard_normal(d)))
        self.mean_y = geo.mean * _unit(shared + 0.35 * _unit(g.standard_normal(d)))
        self.vec: dict[str, dict[str, np.ndarray]] = {"x": {}, "y": {}}
        for col, values in SPACE.values.items():
            base = _unit(g.standard_normal((len(values), d)))
            if col == "object":  # pairs of confusable classes share most of their direction
                group = _unit(g.standard_normal((len(values) // 2, d)))
                base = _unit(np.repeat(group, 2, axis=0) + 0.6 * base)
            other = _unit(g.standard_normal((len(values), d)))
            text = _unit(geo.alignment * base + np.sqrt(1 - geo.alignment**2) * other)
            for k, v in enumerate(values):
                self.vec["x"][v] = WEIGHTS[col] * base[k]
                self.vec["y"][v] = WEIGHTS[col] * text[k]
        self.templates = 0.8 * _unit(g.standard_normal((len(BOILERPLATE), d)))

    def concepts(self, side: str, table: pd.DataFrame) -> np.ndarray:
        out = np.zeros((len(table), self.d))
        for col in SPACE.values:
            out += np.stack([self.vec[side][v] for v in table[col]])
        return out

    def nuisance(self, rng: np.random.Generator, n: int) -> np.ndarray:
        z = rng.standard_normal((n, self.d)) * self.spec * np.sqrt(self.d / (self.spec**2).sum())
        return self.geo.nuisance / np.sqrt(self.d) * z @ self.basis.T


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)
