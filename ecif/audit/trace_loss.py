"""The test loss of a trace-back query, the merge of neighbour lists (docs/math.md section 8),
and the table of a trace's two lists.

A query is one embedding against candidate answers of the other modality with one or more
correct ones: L = -log sum_{c correct} softmax_c(t x^T M y_c) (image -> text) or the same with
t x_c^T M y (text -> image). With one correct answer this is ``ecif.classification_gradient``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ecif.audit.copies import rows_holding
from ecif.engine.head import Head


@dataclass
class TraceQuery:
    """A test loss: one query vector against candidate answers of the other modality."""

    direction: str  # "image->text" or "text->image"
    vector: np.ndarray  # the query embedding
    candidates: np.ndarray  # (C, d) embeddings of the answers
    positive: np.ndarray  # (C,) bool: the correct answers
    labels: list[str]  # how to show each answer
    image: np.ndarray | None = None  # search vector for image-side neighbours
    text: np.ndarray | None = None  # search vector for text-side neighbours
    description: str = ""


def _unit(v: Any) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def query_loss_and_gradient(head: Head, q: TraceQuery) -> tuple[dict[str, Any], torch.Tensor]:
    """The query's loss, prediction and gradient w.r.t. the head's parameters.

    With a single positive this is ``ecif.classification_gradient``.
    """
    dev, dt = head.m.device, head.dtype
    v = torch.as_tensor(np.asarray(q.vector), dtype=dt, device=dev).reshape(-1)
    c = torch.as_tensor(np.asarray(q.candidates), dtype=dt, device=dev)
    pos = torch.as_tensor(np.asarray(q.positive), dtype=torch.bool, device=dev)
    if not bool(pos.any()):
        raise ValueError("the query has no correct answer among its candidates")
    t = head.logit_scale
    image_side = q.direction == "image->text"
    logits = t * ((v @ head.m) @ c.T if image_side else c @ (head.m @ v))
    log_p = torch.log_softmax(logits, 0)
    loss = -torch.logsumexp(log_p[pos], 0)
    p = log_p.exp()
    r = torch.where(pos, p, torch.zeros_like(p))
    err = p - r / r.sum()  # dL/dlogits
    g_m = t * (torch.outer(v, err @ c) if image_side else torch.outer(err @ c, v))
    pred = int(logits.argmax())
    info = {
        "loss": float(loss),
        "p_correct": float(r.sum()),
        "predicted": q.labels[pred] if q.labels else pred,
        "predicted_index": pred,
        "correct": bool(q.positive[pred]),
    }
    return info, head.flatten(g_m, (err * logits).sum())


def interleave(lists: list[np.ndarray], count: int) -> np.ndarray:
    """Round-robin merge of ranked row lists, duplicates and -1 dropped, cut at ``count``."""
    out: list[int] = []
    seen: set[int] = set()
    longest = max((len(x) for x in lists), default=0)
    for i in range(longest):
        for rows in lists:
            if i < len(rows) and rows[i] >= 0 and int(rows[i]) not in seen:
                seen.add(int(rows[i]))
                out.append(int(rows[i]))
                if len(out) >= count:
                    return np.asarray(out, dtype=np.int64)
    return np.asarray(out, dtype=np.int64)


def result_table(ranked: pd.DataFrame, tb: Any, q: TraceQuery, k: int) -> pd.DataFrame:
    """Two lists in one table: ``list`` is "responsible" (most negative first) or "helped";
    ``tb`` (a ``TraceBack``) gives the captions and the training embeddings."""
    rel = ranked["relative_influence"].to_numpy()
    neg = ranked[rel < 0].sort_values("relative_influence").head(k)
    pos = ranked[rel > 0].sort_values("relative_influence", ascending=False).head(k)
    parts = []
    for name, part in (("responsible", neg), ("helped", pos)):
        part = part.copy()
        part.insert(0, "list", name)
        part.insert(1, "rank", np.arange(1, len(part) + 1))
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    r = out["row"].to_numpy()
    out["caption"] = tb.captions(r)
    out["copies"] = rows_holding(tb.copies, r)  # rows of the set that hold this pair
    if q.image is not None and len(r):
        out["image_similarity"] = _unit(np.asarray(tb.train.image[r])) @ _unit(q.image)
    if q.text is not None and len(r):
        out["text_similarity"] = _unit(np.asarray(tb.train.text[r])) @ _unit(q.text)
    return out
