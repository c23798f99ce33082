"""Synthetic "shapes" image-text pairs: a visual dataset that needs no download.

Each image is one coloured shape on a plain background; its caption names the shape, colour,
size, position and background ("a small red circle on the left, black background"). Jitter in
position, size, colour and pixel noise keeps it from being trivial. ``noise`` shuffles a
fraction of captions among themselves, and ``is_corrupted`` records which, so influence scores
can be checked against ground truth.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ecif.atomic import atomic_path
from ecif.data.noisy import NOISE_KINDS, AttributeSpace, caption_texts, plant_noise

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SIZES = ("small", "large")
POSITIONS = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the center": (0.5, 0.5),
}
BACKGROUNDS = {"white": (235, 235, 235), "black": (20, 20, 20), "grey": (128, 128, 128)}
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
# near-miss shapes (similar outlines at the tiny model's resolution), for confusable swaps
CONFUSABLE = {
    "circle": ("square",),
    "square": ("circle",),
    "triangle": ("cross",),
    "cross": ("triangle",),
}


@dataclass
class ShapesData:
    """Images (N, H, W, 3) uint8 and a DataFrame with one row per pair.

    Frame columns: ``key`` (str id), ``caption`` (possibly shuffled), ``true_caption``,
    ``is_corrupted`` and the attributes ``shape``, ``colour``, ``size``, ``position``,
    ``background``.
    """

    images: np.ndarray
    frame: pd.DataFrame

    def __len__(self) -> int:
        return len(self.frame)

    def pil(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    @property
    def captions(self) -> list[str]:
        return self.frame["caption"].tolist()

    def to_parquet(
        self, folder: str | os.PathLike, shard_size: int = 1000, image_format: str = "jpg"
    ) -> list[Path]:
        """Write img2dataset-style parquet shards (``00000.parquet`` ...) and return their paths.

        Columns: ``key``, ``caption``, ``url``, ``status``, ``error_message``, ``width``,
        ``height``, ``sha256``, the encoded image under ``jpg`` or ``png``, plus the ground
        truth columns, so the real embedding path can run on them.
        """
        if image_format not in ("jpg", "png"):
            raise ValueError("image_format must be 'jpg' or 'png'")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for s, start in enumerate(range(0, len(self), shard_size)):
            part = self.frame.iloc[start : start + shard_size].reset_index(drop=True)
            blobs = [_encode(self.images[i], image_format) for i in range(start, start + len(part))]
            h, w = self.images.shape[1:3]
            table = pd.DataFrame(
                {
                    "key": part["key"],
                    "caption": part["caption"],
                    "url": [f"synthetic://shapes/{k}" for k in part["key"]],
                    "status": "success",
                    "error_message": None,
                    "width": w,
                    "height": h,
                    "sha256": [hashlib.sha256(b).hexdigest() for b in blobs],
                    image_format: blobs,
                }
            )
            truth = ("true_caption", "is_corrupted", "corrupted_attribute", *ATTRIBUTES)
            extra = [c for c in part.columns if c not in truth and c not in ("key", "caption")]
            for col in [c for c in truth if c in part.columns] + extra:  # digits: no shape
                table[col] = part[col].to_numpy()
            path = folder / f"{s:05d}.parquet"
            with atomic_path(path) as tmp:
                table.to_parquet(tmp, index=False)
            paths.append(path)
        return paths


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
    else:
        Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def caption_of(shape: str, colour: str, size: str, position: str, background: str) -> str:
    return f"a {size} {colour} {shape} {position}, {background} background"


def _draw(rng: np.random.Generator, attrs: dict, image_size: int) -> np.ndarray:
    s = image_size
    bg = np.array(BACKGROUNDS[attrs["background"]], dtype=float)
    bg = np.clip(bg + rng.normal(0, 10, 3), 0, 255)
    img = Image.new("RGB", (s, s), tuple(int(c) for c in bg))
    d = ImageDraw.Draw(img)
    fg = np.array(COLOURS[attrs["colour"]], dtype=float)
    fg = tuple(int(c) for c in np.clip(fg + rng.normal(0, 12, 3), 0, 255))
    frac = rng.uniform(0.09, 0.13) if attrs["size"] == "small" else rng.uniform(0.19, 0.25)
    r = frac * s
    cx, cy = POSITIONS[attrs["position"]]
    cx = (cx + rng.uniform(-0.06, 0.06)) * s
    cy = (cy + rng.uniform(-0.06, 0.06)) * s
    shape = attrs["shape"]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        q = r * 0.9
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fg)
    else:  # cross
        t = r * 0.35
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fg)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fg)
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + rng.integers(-12, 13, size=arr.shape, dtype=np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


def shapes(
    n: int = 2000,
    seed: int = 0,
    noise: float = 0.0,
    image_size: int = 64,
    noise_kind: str = "shuffle",
) -> ShapesData:
    """Make ``n`` deterministic shape pairs; ``noise`` of the captions are corrupted.

    ``noise_kind="shuffle"``: those rows get another row's caption, never one equal to their
    own (gross misalignment). ``"attribute"``: one attribute word of the caption is changed
    to another value (subtle misalignment; ``corrupted_attribute`` names it). ``"confusable"``,
    ``"boilerplate"``, ``"mixed"``: as in ``ecif.data.noisy`` (``corrupted_attribute`` names
    the kind). Corrupted rows are marked ``is_corrupted``. Same arguments, same bytes.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError("noise must be in [0, 1]")
    if noise_kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind must be one of {NOISE_KINDS}; got {noise_kind!r}")
    if n < 1:
        raise ValueError("n must be >= 1")
    rng = np.random.default_rng(seed)
    cols = {
        "shape": rng.choice(SHAPES, n),
        "colour": rng.choice(list(COLOURS), n),
        "size": rng.choice(SIZES, n),
        "position": rng.choice(list(POSITIONS), n),
        "background": rng.choice(list(BACKGROUNDS), n),
    }
    frame = pd.DataFrame(cols)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i, row in enumerate(frame.itertuples(index=False)):
        images[i] = _draw(rng, row._asdict(), image_size)
    true = [caption_of(*r) for r in frame[list(ATTRIBUTES)].itertuples(index=False)]
    frame.insert(0, "key", [f"shapes-{seed}-{i:06d}" for i in range(n)])
    frame.insert(1, "true_caption", true)
    captions = np.array(true, dtype=object)
    corrupted = np.zeros(n, dtype=bool)
    which = np.full(n, None, dtype=object)
    k = int(round(noise * n))
    if noise_kind == "shuffle" and k >= 2:
        chosen = rng.choice(n, size=k, replace=False)
        corrupted[chosen] = _shuffle_distinct(rng, captions, chosen)
        which[chosen] = "shuffle"
    elif noise_kind == "attribute" and k >= 1:
        chosen = rng.choice(n, size=k, replace=False)
        values = {"shape": SHAPES, "colour": list(COLOURS), "size": SIZES,
                  "position": list(POSITIONS), "background": list(BACKGROUNDS)}  # fmt: skip
        for i in chosen:
            attrs = frame.loc[i, list(ATTRIBUTES)].to_dict()
            name = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
            attrs[name] = rng.choice([v for v in values[name] if v != attrs[name]])
            captions[i] = caption_of(*(attrs[a] for a in ATTRIBUTES))
            which[i] = name
        corrupted[chosen] = True
    elif noise_kind in ("confusable", "boilerplate", "mixed"):
        values = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES,
                  "position": tuple(POSITIONS), "background": tuple(BACKGROUNDS)}  # fmt: skip
        space = AttributeSpace(class_col="shape", confusable=CONFUSABLE, values=values)
        caps, corrupted, which = plant_noise(
            frame[list(ATTRIBUTES)], space, noise, noise_kind, seed + 7919
        )
        captions = np.array(
            caption_texts(caps, lambda r: caption_of(*(r[a] for a in ATTRIBUTES))), dtype=object
        )
    frame.insert(1, "caption", captions)
    frame["is_corrupted"] = corrupted
    frame["corrupted_attribute"] = which
    return ShapesData(images=images, frame=frame)


def _shuffle_distinct(rng: np.random.Generator, captions: np.ndarray, chosen: np.ndarray) -> bool:
    """Rotate captions among ``chosen`` rows, re-drawing until none keeps an equal caption."""
    original = captions[chosen].copy()
    for _ in range(100):
        perm = rng.permutation(len(chosen))
        new = np.empty_like(original)
        new[perm] = original[np.roll(perm, 1)]  # each row takes its predecessor's caption
        if not (new == original).any():
            captions[chosen] = new
            return True
        # swap colliding entries with random partners, then re-check
        bad = np.nonzero(new == original)[0]
        for b in bad:
            j = rng.integers(len(chosen))
            if new[j] != original[b] and new[b] != original[j]:
                new[b], new[j] = new[j], new[b]
        if not (new == original).any():
            captions[chosen] = new
            return True
    raise RuntimeError("could not shuffle captions so that all differ (too few distinct ones)")
