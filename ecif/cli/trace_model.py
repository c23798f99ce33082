"""``ecif trace`` on a model-mode audit: a test pair's image against the test captions, its
gradient through the trainable part, and every training pair's relative influence on it."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch


def model_query(args: argparse.Namespace):
    """(query features, candidate features, positive flags, candidate labels, description)
    for ``--query-id ID --test FOLDER`` (the only query a model-mode trace takes: files and
    free text would need the trunk, which the audit does not hold)."""
    from ecif.audit.labels import answer_labels
    from ecif.cli.model_folder import features_of
    from ecif.data.embedding_set import EmbeddingSet

    if args.query_id is None or args.image or args.caption or args.classes:
        raise ValueError(
            "a model-mode audit traces --query-id ID --test FOLDER only (a test folder "
            "embedded with the same --cache-features); --image, --caption and --classes need "
            "the head mode"
        )
    if not args.test:
        raise ValueError("--query-id needs --test EMB_FOLDER (the set holding that id)")
    feats = features_of(args.test)
    test = EmbeddingSet.load(args.test)
    ids = pd.Index([str(i) for i in test.ids])
    key = answer_labels(test, args.label_col)[ids.get_indexer([str(i) for i in feats.ids])]
    where = np.nonzero(np.asarray([str(i) for i in feats.ids]) == str(args.query_id))[0]
    if len(where) == 0:
        raise KeyError(f"--query-id {args.query_id!r} is not in {args.test}")
    pos = int(where[0])
    meta = test.metadata
    labels = [str(c) for c in meta["caption"]] if meta is not None and "caption" in meta else None
    names = np.asarray(labels if labels else [str(i) for i in test.ids], dtype=object)
    names = names[ids.get_indexer([str(i) for i in feats.ids])]
    what = f"test pair {args.query_id}: its image against the {len(names)} test captions"
    return feats.image[pos], feats.text, key == key[pos], names, what


def run_model(args: argparse.Namespace, k: int) -> tuple[pd.DataFrame, dict]:
    """The trace table (list, rank, id, relative_influence, influence, caption) and its info."""
    from ecif.cli.model_folder import model_audit
    from ecif.data.embedding_set import EmbeddingSet
    from ecif.engine.model_trace import query_gradient, query_loss, relative_influence

    train, model, info = model_audit(args.audit)
    query, cands, positive, names, what = model_query(args)
    with torch.no_grad():
        loss = float(query_loss(model, query, cands, positive))
        # the prediction: the candidate the model ranks first (loss with that one as the answer)
        scores = [-float(query_loss(model, query, cands, np.arange(len(cands)) == c))
                  for c in range(len(cands))]  # fmt: skip
    top = int(np.argmax(scores))
    g = query_gradient(model, query, cands, positive)
    table = relative_influence(model, train, g, seed=0)
    train_set = EmbeddingSet.load(info["embeddings"])
    meta = train_set.metadata
    if meta is not None and "caption" in meta:
        by_id = pd.Series(list(meta["caption"]), index=[str(i) for i in train_set.ids])
        table["caption"] = by_id.reindex([str(i) for i in table["id"]]).to_numpy()
    else:
        table["caption"] = ""
    order = table.sort_values("relative_influence", kind="stable")
    parts = []
    for name, rows in (("responsible", order.head(k)), ("helped", order.tail(k)[::-1])):
        rows = rows[(rows["relative_influence"] < 0) == (name == "responsible")]
        parts.append(rows.assign(list=name, rank=np.arange(1, len(rows) + 1)))
    out = pd.concat(parts, ignore_index=True)
    return out, {
        "query": what,
        "predicted": str(names[top]),
        "correct": bool(positive[top]),
        "p_correct": float(np.exp(-loss)),
        "loss": loss,
        "candidates": len(table),
        "solver": "probe",
    }
