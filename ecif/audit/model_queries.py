"""Queries for trace-back on a model-mode audit, from any input a user has: a test pair of a
folder embedded with the same feature cache, an image file, or free text.

A model mode's query is a feature row (what enters the fitted part) against candidate rows
of the other modality. Files and text reach that form through the frozen trunk of the model
that made the training cache (named in its ``trainable_init.pt``), cut where the cache was
(``ecif.data.features.encode``), rounded to the cache's float16 so a file traces exactly as
the same image's cached row. Candidates for files and text are the nearest training pairs
by the frozen embeddings, as in the head mode (``ecif.audit.trace``); class prompts give a
zero-shot query instead.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ecif.audit.labels import POSITIVE_COSINE, answer_labels, caption_key, caption_positives
from ecif.audit.trace_loss import _unit


@dataclass
class ModelQuery:
    """One query row against candidate rows of the other modality, and which are right."""

    direction: str
    query: np.ndarray  # (F,) feature row
    candidates: np.ndarray  # (C, F') feature rows
    positive: np.ndarray  # (C,) bool
    names: np.ndarray  # (C,) what each candidate is, for the prediction line
    description: str
    init: dict | None = None  # a test folder's cache record: must be the audit's trainable part


class TrunkEncoder:
    """The frozen trunk of a training cache's model: files and text -> cached-layout rows.

    ``init``: the cache's ``trainable_init.pt`` dict (it names the model and its weights);
    ``kind`` and ``blocks``: where the cache cut the towers."""

    def __init__(self, init: dict, kind: str, blocks: int = 1, device: str = "cpu"):
        if not init.get("model"):
            raise ValueError(
                "the feature cache names no model (trainable_init.pt); image files and text "
                "cannot be encoded: use --query-id with --test"
            )
        self.init, self.kind, self.blocks, self.device = init, kind, int(blocks), device
        self._lm = None

    def model(self):
        if self._lm is None:
            from ecif.data.models import load_model

            self._lm = load_model(self.init["model"], self.init.get("pretrained"), self.device)
        return self._lm

    @torch.no_grad()
    def encode(
        self, images: list[str | os.PathLike] | None = None, texts: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(image rows, text rows, unit image embeddings, unit text embeddings); a side not
        asked for comes back empty. Rows are float16-rounded, as the cache stores them."""
        from PIL import Image

        from ecif.data.features import encode

        lm = self.model()
        size = lm.image_size
        if images:
            pix = torch.stack([lm.preprocess(Image.open(p).convert("RGB")) for p in images])
        else:  # the trunk runs both towers; a blank image stands in and is dropped
            pix = torch.zeros(1, 3, size, size)
        tokens = lm.tokenizer(texts or [""])
        fu, fv, u, v = encode(
            lm.model, pix.to(lm.device), tokens.to(lm.device), self.kind, self.blocks
        )

        def rows(t: torch.Tensor) -> np.ndarray:
            return t.to(torch.float16).float().cpu().numpy()

        def emb(t: torch.Tensor) -> np.ndarray:
            return _unit(t.float().cpu().numpy())

        n_img, n_txt = (len(images) if images else 0), (len(texts) if texts else 0)
        return rows(fu)[:n_img], rows(fv)[:n_txt], emb(u)[:n_img], emb(v)[:n_txt]


@dataclass
class ModelAuditInputs:
    """What a model-mode query needs of its audit: the training cache (feature rows), the
    training embeddings and captions (to find a file's or a text's nearest pairs), the trunk
    encoder (loaded on first use) and the fitted part (``fitted``, when the caller has it: the
    trace then does not read it again)."""

    features: Any  # ecif.data.features.FeatureSet
    embeddings: Any  # ecif.data.embedding_set.EmbeddingSet, rows aligned with features
    encoder: TrunkEncoder
    fitted: Any = None  # ecif.engine.encoder_model.EncoderModel

    @classmethod
    def of(
        cls,
        features: Any,
        embedding_folder: str | os.PathLike,
        device: str = "cpu",
        fitted: Any = None,
    ):
        from ecif.data.embedding_set import EmbeddingSet
        from ecif.data.layout import read_manifest

        emb = EmbeddingSet.load(embedding_folder)
        at = pd.Index([str(i) for i in emb.ids]).get_indexer([str(i) for i in features.ids])
        if (at < 0).any():
            raise ValueError(f"{embedding_folder}: its embeddings and feature cache disagree")
        emb = emb.subset(at)
        blocks = ((read_manifest(embedding_folder) or {}).get("features") or {}).get("blocks", 1)
        encoder = TrunkEncoder(features.init, features.kind, blocks, device)
        return cls(features, emb, encoder, fitted)

    def captions(self, rows: np.ndarray) -> list[str]:
        meta = self.embeddings.metadata
        if meta is not None and "caption" in meta:
            return [str(c) for c in meta["caption"].to_numpy()[rows]]
        return [str(i) for i in np.asarray(self.embeddings.ids)[rows]]

    def nearest(self, side: str, vector: np.ndarray, count: int) -> np.ndarray:
        """Training rows whose frozen ``side`` ("image"/"text") embedding is nearest."""
        table = self.embeddings.image if side == "image" else self.embeddings.text
        sims = _unit(np.asarray(table)) @ vector
        count = min(count, len(sims))
        top = np.argpartition(-sims, count - 1)[:count]
        return top[np.argsort(-sims[top], kind="stable")]


def class_query(
    inputs: ModelAuditInputs, image_row: np.ndarray, classes: list[str], label: int, name: str
) -> ModelQuery:
    """Zero-shot: an image row against the class prompts' text rows; ``label`` is right."""
    if not 0 <= label < len(classes):
        raise ValueError(f"--label {label} is outside the {len(classes)} classes")
    _, rows, _, _ = inputs.encoder.encode(texts=list(classes))
    positive = np.arange(len(classes)) == label
    what = f"{name} against {len(classes)} class prompts (true: {classes[label]!r})"
    return ModelQuery("image->text", image_row, rows, positive, np.asarray(classes), what)


def image_query(
    inputs: ModelAuditInputs,
    path: str | os.PathLike,
    *,
    caption: str | None = None,
    classes: list[str] | None = None,
    label: int | None = None,
    competitors: int = 50,
    name: str | None = None,
) -> ModelQuery:
    """An image file: zero-shot against ``classes`` with the true ``label``, or its right
    ``caption`` against the image's ``competitors`` nearest training captions."""
    name = name or str(path)
    img_rows, _, img_emb, _ = inputs.encoder.encode(images=[path])
    if classes:
        if label is None:
            raise ValueError("--classes needs the true class --label")
        return class_query(inputs, img_rows[0], classes, label, name)
    if caption is None:
        raise ValueError("an image query needs --caption (the right text) or --classes/--label")
    _, cap_rows, _, _ = inputs.encoder.encode(texts=[caption])
    rows = inputs.nearest("text", img_emb[0], competitors)
    caps = inputs.captions(rows)
    rows = rows[[caption_key(c) != caption_key(caption) for c in caps]]
    cand = np.concatenate([cap_rows, np.asarray(inputs.features.text[rows], dtype=np.float32)])
    positive = np.zeros(len(cand), dtype=bool)
    positive[0] = True
    names = np.asarray([caption, *inputs.captions(rows)], dtype=object)
    what = f"{name}: {caption!r} against the image's {len(rows)} nearest training captions"
    return ModelQuery("image->text", img_rows[0], cand, positive, names, what)


def caption_query(inputs: ModelAuditInputs, caption: str, *, competitors: int = 50) -> ModelQuery:
    """Free text: text -> image against its nearest training images; right are the images
    whose training caption is this caption (see ``caption_positives``)."""
    _, cap_rows, _, cap_emb = inputs.encoder.encode(texts=[caption])
    y = cap_emb[0]
    near_img = inputs.nearest("image", y, competitors)
    near_txt = inputs.nearest("text", y, competitors)
    tv = _unit(np.asarray(inputs.embeddings.text))
    same = near_txt[tv[near_txt] @ y >= POSITIVE_COSINE]
    rows = np.unique(np.concatenate([near_img, same]))
    caps = inputs.captions(rows)
    positive = caption_positives(caps, caption, tv[rows] @ y)
    if not positive.any():
        raise ValueError(
            f"no training pair near {caption!r} carries that caption: give --image FILE with "
            "it (the image the caption should retrieve)"
        )
    ids = np.asarray(inputs.embeddings.ids)[rows]
    names = np.asarray([f"image of {i} ({c})" for i, c in zip(ids, caps)], dtype=object)
    what = f"{caption!r} against its {len(rows)} nearest training images ({int(positive.sum())} carry the caption)"
    cand = np.asarray(inputs.features.image[rows], dtype=np.float32)
    return ModelQuery("text->image", cap_rows[0], cand, positive, names, what)


def pair_query(
    test_folder: str | os.PathLike,
    query_id: Any,
    *,
    label_col: str | None = None,
    inputs: ModelAuditInputs | None = None,
    classes: list[str] | None = None,
    label: int | None = None,
) -> ModelQuery:
    """A test pair of a folder embedded with the same cache: its image against the test
    captions (a caption is right when it carries the pair's label: ``answer_labels``), or
    against class prompts (``classes``, ``label``; needs ``inputs`` for the trunk)."""
    from ecif.data.embedding_set import EmbeddingSet
    from ecif.data.features import load_features

    feats = load_features(test_folder)
    test = EmbeddingSet.load(test_folder)
    fid = [str(i) for i in feats.ids]
    where = np.nonzero(np.asarray(fid) == str(query_id))[0]
    if len(where) == 0:
        raise KeyError(f"query id {query_id!r} is not in {test_folder}")
    pos = int(where[0])
    name = f"test pair {query_id}"
    if classes:
        if inputs is None:
            raise ValueError("class prompts need the model's trunk (pass inputs)")
        if label is None:
            raise ValueError("--classes needs the true class --label")
        q = class_query(inputs, np.asarray(feats.image[pos]), classes, label, name)
        return dataclasses.replace(q, init=feats.init)
    at = pd.Index([str(i) for i in test.ids]).get_indexer(fid)
    key = answer_labels(test, label_col)[at]
    meta = test.metadata
    names = (
        [str(c) for c in meta["caption"]]
        if meta is not None and "caption" in meta
        else [str(i) for i in test.ids]
    )
    names = np.asarray(names, dtype=object)[at]
    what = f"{name}: its image against the {len(names)} test captions"
    return ModelQuery(
        "image->text", feats.image[pos], feats.text, key == key[pos], names, what, feats.init
    )
