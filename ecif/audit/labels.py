"""When is a retrieved caption the right answer for an image? One definition for every verb.

``ecif clean``'s validation accuracy and ``ecif trace``'s test-pair queries both count a
prediction as correct when the predicted caption carries the same label as the pair's own:
the value of a label column when one is given (``--label-col``: correctness follows classes),
else the caption itself, compared without case and surrounding or repeated whitespace (so a
repeated caption such as "a photo of a 3" is right wherever it appears). Sets without
captions fall back to the pair's own id (only its own caption is right).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def caption_key(caption: Any) -> str:
    """The form in which two captions are compared: lower case, single spaces."""
    return " ".join(str(caption).split()).lower()


def answer_labels(data: Any, label_col: str | None = None) -> np.ndarray:
    """One label per pair of ``data`` (an EmbeddingSet); equal labels = interchangeable answers."""
    meta = data.metadata
    if label_col is not None:
        if meta is None or label_col not in meta:
            cols = [] if meta is None else list(meta.columns)
            raise ValueError(f"label column {label_col!r} is not in the metadata columns {cols}")
        return np.asarray([str(v) for v in meta[label_col]], dtype=object)
    if meta is not None and "caption" in meta:
        return np.asarray([caption_key(c) for c in meta["caption"]], dtype=object)
    return np.asarray([f"id:{i}" for i in data.ids], dtype=object)


def label_codes(data: Any, label_col: str | None = None) -> np.ndarray:
    """``answer_labels`` as integer codes (equal code = equal label)."""
    codes, _ = pd.factorize(answer_labels(data, label_col))
    return codes


def check_class_prompts(names: list[str], where: str) -> None:
    """Zero-shot needs two prompts or more, each once: a file of blank lines was dropped
    silently (the query fell back to the test captions), one prompt gave loss -0, and a
    repeated prompt took a share of the probability as a wrong answer."""
    if len(names) < 2:
        raise ValueError(f"{where}: {len(names)} class prompt(s); give two or more, one a line")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: class prompt(s) given twice: {repeated[:3]}")


# a caption query's right answers when no candidate carries its words: a paraphrase this close
POSITIVE_COSINE = 0.98


def caption_positives(captions: list[str], caption: str, cosines: np.ndarray) -> np.ndarray:
    """Which candidates of a caption query (``ecif trace --caption``) are right: those whose
    caption is the query's (``caption_key``); only where none is, those whose caption embeds
    within ``POSITIVE_COSINE`` of it (``cosines``). Why not both: a small text encoder puts
    "on the left" and "on the right" within 0.98, and 25 of 80 demo captions then counted an
    image of the other position as a right answer."""
    said = caption_key(caption)
    exact = np.array([caption_key(c) == said for c in captions], dtype=bool)
    return exact if exact.any() else np.asarray(cosines) >= POSITIVE_COSINE
