"""Handwritten digits as coloured image-text pairs: a real-image domain the tiny CLIP never saw.

scikit-learn's bundled 8x8 digits (1,797 scans; no download) are drawn in a colour on a
background at a size and offset, and captioned "a small red digit three on black". The shapes
model has to meet a domain it does not know here, which is where frozen-embedding audits are
weakest; the ``is_corrupted`` columns say which captions were planted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from ecif.data.noisy import AttributeSpace, caption_texts, plant_noise
from ecif.data.shapes import ShapesData

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (60, 90, 230),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
}
BACKGROUNDS = {"black": (15, 15, 15), "grey": (120, 120, 120), "navy": (20, 25, 80)}
SIZES = ("small", "large")
# near-miss classes: digits whose strokes are easily mistaken for one another
CONFUSABLE = {
    "zero": ("six", "eight"),
    "one": ("seven",),
    "two": ("seven", "three"),
    "three": ("eight", "five"),
    "four": ("nine",),
    "five": ("six", "three"),
    "six": ("five", "zero"),
    "seven": ("one", "two"),
    "eight": ("three", "zero"),
    "nine": ("four", "seven"),
}
SPACE = AttributeSpace(
    class_col="digit",
    confusable=CONFUSABLE,
    values={
        "size": SIZES,
        "colour": tuple(COLOURS),
        "digit": WORDS,
        "background": tuple(BACKGROUNDS),
    },
)


def digit_caption(row: dict) -> str:
    return f"a {row['size']} {row['colour']} digit {row['digit']} on {row['background']}"


def digits(
    n: int = 2000,
    seed: int = 0,
    noise: float = 0.0,
    noise_kind: str = "shuffle",
    image_size: int = 32,
) -> ShapesData:
    """``n`` deterministic digit pairs, ``noise`` of them with a planted caption
    (``ecif.data.noisy`` kinds). Same frame columns as ``shapes``: ``key``, ``caption``,
    ``true_caption``, ``is_corrupted``, ``corrupted_attribute`` (the noise kind) and the
    attributes (``digit``, ``colour``, ``size``, ``background``)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    if n < 1:
        raise ValueError("n must be >= 1")
    scans = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(scans.target), n)
    attrs = pd.DataFrame(
        {
            "size": rng.choice(SIZES, n),
            "colour": rng.choice(list(COLOURS), n),
            "digit": [WORDS[t] for t in scans.target[pick]],
            "background": rng.choice(list(BACKGROUNDS), n),
        }
    )
    images = np.stack(
        [_draw(scans.images[p], attrs.iloc[i], image_size, rng) for i, p in enumerate(pick)]
    )
    caps, corrupted, kinds = plant_noise(attrs, SPACE, noise, noise_kind, seed + 7919)
    frame = attrs.copy()
    frame.insert(0, "key", [f"digits-{seed}-{i:06d}" for i in range(n)])
    frame.insert(1, "caption", caption_texts(caps, digit_caption))
    frame.insert(2, "true_caption", [digit_caption(r) for r in attrs.to_dict("records")])
    frame["is_corrupted"] = corrupted
    frame["corrupted_attribute"] = kinds
    return ShapesData(images=images, frame=frame)


def _draw(scan: np.ndarray, attrs: pd.Series, size: int, rng: np.random.Generator) -> np.ndarray:
    side = int(
        size * (rng.uniform(0.45, 0.6) if attrs["size"] == "small" else rng.uniform(0.8, 0.95))
    )
    glyph = Image.fromarray((scan / 16.0 * 255).astype(np.uint8)).resize(
        (side, side), Image.BILINEAR
    )
    alpha = np.asarray(glyph, dtype=float)[..., None] / 255.0
    fg = np.clip(np.array(COLOURS[attrs["colour"]], float) + rng.normal(0, 12, 3), 0, 255)
    bg = np.clip(np.array(BACKGROUNDS[attrs["background"]], float) + rng.normal(0, 8, 3), 0, 255)
    canvas = np.broadcast_to(bg, (size, size, 3)).copy()
    top, left = rng.integers(0, size - side + 1, 2)
    patch = canvas[top : top + side, left : left + side]
    canvas[top : top + side, left : left + side] = alpha * fg + (1 - alpha) * patch
    canvas += rng.normal(0, 6, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)
