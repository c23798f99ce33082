"""Pair detail and trace-back helpers for the app: neighbours, negative-term breakdown, queries.

Everything takes already-loaded objects (training set, heads, w, TraceBack) so the pages can
keep those behind ``st.cache_resource`` and pay for them once per audit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ecif.api import Head, negative_breakdown
from ecif.audit.copies import left_out_copies
from ecif.audit.folder import AuditFolderError, read_heads
from ecif.data.embedding_set import EmbeddingSet


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def neighbours(
    train: EmbeddingSet, row: int, k: int = 8, indexes: dict | None = None
) -> pd.DataFrame:
    """The k training pairs nearest to pair ``row``, by image and by caption (cosine).

    Uses the audit's FAISS indexes when given, else a brute-force product in chunks.
    """
    out = []
    for side, emb in (("image", train.image), ("caption", train.text)):
        q = _unit(emb[row])
        if indexes and ("image" if side == "image" else "text") in indexes:
            sims, rows = indexes["image" if side == "image" else "text"].search(q[None], k + 1)
            sims, rows = sims[0], rows[0]
        else:
            sims = np.concatenate(
                [_unit(emb[s : s + 65536]) @ q for s in range(0, len(emb), 65536)]
            )
            rows = np.argsort(-sims, kind="stable")[: k + 1]
            sims = sims[rows]
        keep = (rows != row) & (rows >= 0)
        rows, sims = rows[keep][:k], sims[keep][:k]
        out.append(pd.DataFrame({"by": side, "row": rows, "id": train.ids[rows], "cosine": sims}))
    return pd.concat(out, ignore_index=True)


def full_head(heads: list[Head], n: int, row: int) -> Head | None:
    """The head whose partition covers all n training pairs and holds ``row`` in a batch."""
    for h in heads:
        if h.partition.n == n and h.partition.batch_of()[row] >= 0:
            return h
    return None


def pair_row(heads: list[Head], train: EmbeddingSet, row: int) -> int:
    """``row``, or the first row of its pair when the audit collapsed it as a copy (no batch
    holds it: ``ecif.audit.copies``)."""
    for h in heads:
        if h.partition.n == len(train) and h.partition.batch_of()[row] < 0:
            copies = left_out_copies(h.partition, train)
            return row if copies is None else int(copies.first[row])
    return row


def negative_members(
    folder: str | os.PathLike, train: EmbeddingSet, heads: list[Head], row: int, k: int = 10
) -> pd.DataFrame:
    """The batch members pair ``row`` affected most through the negative term (largest |share|).

    Needs AUDIT/w.npy (H^-1 g_val, written when a validation set was used).
    """
    w_path = Path(folder) / "w.npy"
    if not w_path.exists():
        raise AuditFolderError(
            "no w.npy in the audit folder: the audit ran without a validation set, so the "
            "negative term has no direction to split"
        )
    row = pair_row(heads, train, row)  # a copy's batch members are its pair's
    head = full_head(heads, len(train), row)
    if head is None:
        raise AuditFolderError("no saved head covers this pair's batch (cross-fitted audit?)")
    w = torch.as_tensor(np.load(w_path))
    df = negative_breakdown(head, train, w, row)
    df["id"] = train.ids[df["row"].to_numpy()]
    order = np.argsort(-np.abs(df["share"].to_numpy()), kind="stable")
    return df.iloc[order[:k]].reset_index(drop=True)


def load_heads(folder: str | os.PathLike) -> list[Head]:
    """The audit's heads (empty list when head.pt is missing)."""
    try:
        return read_heads(folder)
    except AuditFolderError:
        return []


def test_folders(info: dict[str, Any]) -> list[str]:
    """The audit's own validation set (audit.json ``validation_embeddings``) first, then other
    embedding folders next to the training embeddings."""
    found = []
    val = info.get("validation_embeddings")
    if val and (Path(val) / "metadata").is_dir():
        found.append(str(val))
    emb = info.get("embeddings")
    if not emb:
        return found
    train = Path(emb)
    for p in sorted(train.parent.iterdir()) if train.parent.is_dir() else []:
        if p.is_dir() and p.resolve() != train.resolve() and (p / "metadata").is_dir():
            if not any(Path(f).resolve() == p.resolve() for f in found):
                found.append(str(p))
    return found


def _class_prompts(classes: list[str] | None, label: int | None) -> list[str] | None:
    """The non-blank prompts (None: no zero-shot), with a usable true ``label``."""
    if classes is None:
        return None
    classes = [c.strip() for c in classes if c.strip()]
    if len(classes) < 2:
        raise ValueError("give at least two class prompts, one per line")
    if label is None or not 0 <= label < len(classes):
        raise ValueError("choose the true class")
    return classes


def run_trace(
    tb: Any,
    kind: str,
    *,
    test: EmbeddingSet | None = None,
    query_id: Any = None,
    image_path: str | os.PathLike | None = None,
    image_name: str | None = None,
    caption: str | None = None,
    classes: list[str] | None = None,
    label: int | None = None,
    k: int = 10,
    candidates: int = 1000,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One trace-back query through ``ecif.audit.trace.TraceBack``: kind is "pair", "image" or
    "caption"; ``classes`` (prompts) with the true ``label`` turn a pair or image query into
    zero-shot classification. Returns (table with a ``list`` column, info)."""
    classes = _class_prompts(classes, label)
    if kind == "pair":
        if test is None:
            raise ValueError("choose a validation/test embedding folder")
        emb = tb.embed_texts(classes) if classes else None
        q = tb.query_from_set(test, query_id, classes=emb, class_names=classes, label=label)
    elif kind == "image":
        if classes:
            q = tb.query_from_image(image_path, classes=classes, label=label, name=image_name)
        elif not caption or not caption.strip():
            raise ValueError("type the caption this image should match")
        else:
            q = tb.query_from_image(image_path, caption=caption.strip(), name=image_name)
    else:
        if not caption or not caption.strip():
            raise ValueError("type a caption")
        q = tb.query_from_caption(caption.strip())
    return tb.trace(q, k=k, candidates=candidates or None)


def run_model_trace(
    folder: str | os.PathLike,
    kind: str,
    *,
    test_path: str | os.PathLike | None = None,
    query_id: Any = None,
    image_path: str | os.PathLike | None = None,
    image_name: str | None = None,
    caption: str | None = None,
    classes: list[str] | None = None,
    label: int | None = None,
    k: int = 10,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``run_trace`` on a model-mode audit (``ecif.audit.model_queries``): every training pair
    is ranked; files and text go through the frozen trunk of the training cache's model."""
    from ecif.audit import model_queries as mq
    from ecif.audit.model_trace_pair import query_inputs, trace_model

    classes = _class_prompts(classes, label)
    # the trunk and the training embeddings: for files, text and class prompts only
    inputs = query_inputs(folder) if kind != "pair" or classes else None
    if kind == "pair":
        if not test_path:
            raise ValueError("choose a validation/test embedding folder")
        q = mq.pair_query(test_path, query_id, inputs=inputs, classes=classes, label=label)
    elif kind == "image":
        if not classes and (not caption or not caption.strip()):
            raise ValueError("type the caption this image should match")
        q = mq.image_query(
            inputs,
            image_path,
            caption=caption.strip() if caption else None,
            classes=classes,
            label=label,
            name=image_name,
        )
    else:
        if not caption or not caption.strip():
            raise ValueError("type a caption")
        q = mq.caption_query(inputs, caption.strip())
    return trace_model(folder, q, k=k, inputs=inputs)
