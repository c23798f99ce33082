"""Trace-back of one test pair on a model-mode audit (``params`` projection or lora): the
pair's image against the test captions, its gradient through the fitted part, and every
training pair ranked by relative influence (``ecif.engine.model_trace``). The CLI's
``ecif trace --query-id`` and the app's trace page both call it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ecif.audit.folder import AuditFolderError, read_models
from ecif.audit.labels import answer_labels


def model_audit(folder: str | os.PathLike) -> tuple[Any, Any, dict]:
    """(training features, the model fit on all of them, audit.json) of a model-mode audit."""
    from ecif.data.features import load_features

    info = json.loads((Path(folder) / "audit.json").read_text())
    if not info.get("embeddings"):
        raise AuditFolderError(f"{folder}/audit.json records no training embeddings")
    train = load_features(info["embeddings"])
    whole = [m for m in read_models(folder) if m.partition.n == len(train.image)]
    if not whole:
        raise AuditFolderError(
            f"{folder}: the audit fit two cross-fitted halves (no validation set); this needs "
            "a model fit on all pairs: rerun `ecif score` with --val"
        )
    return train, whole[0], info


def pair_query(test_folder: str | os.PathLike, query_id: Any, label_col: str | None = None):
    """(query image features, candidate caption features, positive flags, answer names, what):
    a caption is right when it carries the pair's label (``answer_labels``)."""
    from ecif.data.embedding_set import EmbeddingSet
    from ecif.data.features import load_features

    feats = load_features(test_folder)
    test = EmbeddingSet.load(test_folder)
    fid = [str(i) for i in feats.ids]
    at = pd.Index([str(i) for i in test.ids]).get_indexer(fid)
    key = answer_labels(test, label_col)[at]
    where = np.nonzero(np.asarray(fid) == str(query_id))[0]
    if len(where) == 0:
        raise KeyError(f"query id {query_id!r} is not in {test_folder}")
    pos = int(where[0])
    meta = test.metadata
    names = (
        [str(c) for c in meta["caption"]]
        if meta is not None and "caption" in meta
        else [str(i) for i in test.ids]
    )
    names = np.asarray(names, dtype=object)[at]
    what = f"test pair {query_id}: its image against the {len(names)} test captions"
    return feats.image[pos], feats.text, key == key[pos], names, what


def trace_model_pair(
    audit: str | os.PathLike,
    test_folder: str | os.PathLike,
    query_id: Any,
    *,
    k: int = 10,
    label_col: str | None = None,
) -> tuple[pd.DataFrame, dict]:
    """The trace table (list, rank, id, relative_influence, influence, caption) and its info
    (query, predicted, correct, p_correct, loss, candidates, solver)."""
    from ecif.data.embedding_set import EmbeddingSet
    from ecif.engine.model_trace import (
        loss_of_logits,
        query_gradient,
        query_logits,
        relative_influence,
    )

    train, model, info = model_audit(audit)
    query, cands, positive, names, what = pair_query(test_folder, query_id, label_col)
    with torch.no_grad():
        logits = query_logits(model, query, cands)
        loss = float(loss_of_logits(logits, positive))
    top = int(logits.argmax())  # the prediction: the candidate the model ranks first
    table = relative_influence(model, train, query_gradient(model, query, cands, positive))
    train_set = EmbeddingSet.load(info["embeddings"])
    meta = train_set.metadata
    table["caption"] = ""
    if meta is not None and "caption" in meta:
        by_id = pd.Series(list(meta["caption"]), index=[str(i) for i in train_set.ids])
        table["caption"] = by_id.reindex([str(i) for i in table["id"]]).to_numpy()
    order = table.sort_values("relative_influence", kind="stable")
    parts = []
    for name, rows in (("responsible", order.head(k)), ("helped", order.tail(k)[::-1])):
        rows = rows[(rows["relative_influence"] < 0) == (name == "responsible")]
        parts.append(rows.assign(list=name, rank=np.arange(1, len(rows) + 1)))
    return pd.concat(parts, ignore_index=True), {
        "query": what,
        "predicted": str(names[top]),
        "correct": bool(positive[top]),
        "p_correct": float(np.exp(-loss)),
        "loss": loss,
        "candidates": len(table),
        "solver": "probe",
    }
