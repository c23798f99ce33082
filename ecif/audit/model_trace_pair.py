"""Trace-back on a model-mode audit (``params`` projection or lora): a query
(``ecif.audit.model_queries``: a test pair, an image file or free text), its gradient through
the fitted part, and every training pair ranked by relative influence
(``ecif.engine.model_trace``). The CLI's ``ecif trace`` and the app's trace page call it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ecif.audit.folder import AuditFolderError, read_audit_info, read_models
from ecif.audit.model_queries import ModelAuditInputs, ModelQuery
from ecif.audit.model_signals import same_part


def model_audit(folder: str | os.PathLike) -> tuple[Any, Any, dict]:
    """(training features, the model fit on all of them, audit.json) of a model-mode audit."""
    from ecif.data.features import load_features

    info = read_audit_info(folder)
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


def query_inputs(audit: str | os.PathLike, device: str = "cpu") -> ModelAuditInputs:
    """What file and text queries on ``audit`` need (the trunk loads on first use)."""
    train, model, info = model_audit(audit)
    return ModelAuditInputs.of(train, info["embeddings"], device, fitted=model)


def _part_name(init: dict) -> str:
    blocks = (init.get("config") or {}).get("blocks")
    return f"{init.get('kind')}" + (f", {blocks} block(s)" if blocks else "")


NORMS_FILE = "model_norms.npz"  # in AUDIT/index/, beside the head mode's trace.pt


def model_fingerprint(model: Any, probes: int, seed: int) -> str:
    """Changes whenever the fitted part, its batches, its pull or the probe draw change."""
    h = hashlib.sha1()
    h.update(model.theta.detach().cpu().contiguous().numpy().tobytes())
    h.update(np.asarray(model.partition.index).tobytes())
    h.update(repr((model.lam, model.n_norm, model.curvature, probes, seed)).encode())
    return h.hexdigest()[:16]


def pair_norms(
    audit: str | os.PathLike,
    model: Any,
    train: Any,
    inverse: Any,
    *,
    probes: int | None = None,
    progress: Any = None,
) -> np.ndarray:
    """||H^-1 grad R_n|| of every training pair from random probes: the relative-influence
    denominator, the same for every query, so it is computed once per fitted part and kept in
    ``AUDIT/index/model_norms.npz`` (tagged with ``model_fingerprint``; a refit recomputes).
    ``probes``: how many (None: whatever count is kept, else ``DEFAULT_PROBES``)."""
    from ecif.atomic import atomic_path
    from ecif.engine.model_probes import DEFAULT_PROBES, probe_norms

    path = Path(audit) / "index" / NORMS_FILE
    kept = _kept_norms(path, model, len(train.image), probes)
    if kept is not None:
        return kept[0]
    probes = probes or DEFAULT_PROBES
    norms = probe_norms(model, train, probes=probes, inverse=inverse, progress=progress)
    key = model_fingerprint(model, probes, 0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, norms=norms, fingerprint=np.asarray(key), probes=np.asarray(probes))
    except OSError:  # a read-only audit folder: the next query recomputes
        pass
    return norms


def _kept_norms(
    path: Path, model: Any, n: int, probes: int | None
) -> tuple[np.ndarray, int] | None:
    """(norms, probe count) kept at ``path`` for this fitted part, ``n`` pairs and ``probes``
    (None: any count), else None."""
    from ecif.engine.model_probes import DEFAULT_PROBES

    if not path.exists():
        return None
    with np.load(path) as cached:
        kept = int(cached["probes"]) if "probes" in cached else DEFAULT_PROBES
        if (
            probes in (None, kept)
            and str(cached["fingerprint"]) == model_fingerprint(model, kept, 0)
            and len(cached["norms"]) == n
        ):
            return cached["norms"], kept
    return None


def index_model_audit(
    audit: str | os.PathLike, *, probes: int | None = None, show_progress: bool = False
) -> dict:
    """What ``ecif index`` does for a model-mode audit: keep every pair's probe norms so the
    first trace does not pay for them (a trace ranks every pair through the fitted part, so
    there is no nearest-neighbour index to build). Returns pairs, probes, seconds, reused, path."""
    import time

    from tqdm.auto import tqdm

    from ecif.engine.encoder_influence import ModelInverse
    from ecif.engine.model_probes import DEFAULT_PROBES

    start = time.time()
    train, model, _ = model_audit(audit)
    path = Path(audit) / "index" / NORMS_FILE
    kept = _kept_norms(path, model, len(train.image), probes)
    if kept is None:
        count = probes or DEFAULT_PROBES
        with tqdm(total=count, desc="probe norms", unit="probe", disable=not show_progress) as bar:
            inverse = ModelInverse(model, train.image, train.text)
            pair_norms(audit, model, train, inverse, probes=probes, progress=bar.update)
    return {
        "pairs": len(train.image),
        "probes": kept[1] if kept is not None else count,
        "seconds": time.time() - start,
        "reused": kept is not None,
        "path": str(path),
    }


def trace_model(
    audit: str | os.PathLike,
    q: ModelQuery,
    *,
    k: int = 10,
    inputs: ModelAuditInputs | None = None,
) -> tuple[pd.DataFrame, dict]:
    """The trace table (list, rank, id, relative_influence, influence, caption) and its info
    (query, predicted, correct, p_correct, loss, candidates, solver). ``inputs``: what built
    the query (``query_inputs``), so the audit is not read again."""
    from ecif.engine.encoder_influence import ModelInverse
    from ecif.engine.model_trace import (
        loss_of_logits,
        query_gradient,
        query_logits,
        relative_influence,
    )

    if inputs is not None and inputs.fitted is not None:
        train, model = inputs.features, inputs.fitted
    else:
        train, model, _ = model_audit(audit)
    if q.init is not None and not same_part(q.init, train.init):
        raise AuditFolderError(
            f"{q.description.split(':')[0]}: its folder's feature cache is another trainable "
            f"part ({_part_name(q.init)}) than the audit's ({_part_name(train.init)}); embed "
            "the test set with the training set's --params and --cache-blocks"
        )
    kw = dict(direction=q.direction)
    with torch.no_grad():
        logits = query_logits(model, q.query, q.candidates, **kw)
        loss = float(loss_of_logits(logits, q.positive))
    top = int(logits.argmax())  # the prediction: the candidate the model ranks first
    grad = query_gradient(model, q.query, q.candidates, q.positive, **kw)
    inverse = ModelInverse(model, train.image, train.text)
    norms = pair_norms(audit, model, train, inverse)
    table = relative_influence(model, train, grad, norms=norms, inverse=inverse)
    meta = train.metadata  # the cache's rows, in the table's order
    has = meta is not None and "caption" in meta
    table["caption"] = meta["caption"].astype(str).to_numpy() if has else ""
    order = table.sort_values("relative_influence", kind="stable")
    parts = []
    for name, rows in (("responsible", order.head(k)), ("helped", order.tail(k)[::-1])):
        value = rows["relative_influence"]  # exactly 0 (a pair that moved nothing): neither
        rows = rows[value < 0] if name == "responsible" else rows[value > 0]
        parts.append(rows.assign(list=name, rank=np.arange(1, len(rows) + 1)))
    return pd.concat(parts, ignore_index=True), {
        "query": q.description,
        "predicted": str(q.names[top]),
        "correct": bool(q.positive[top]),
        "p_correct": float(np.exp(-loss)),
        "loss": loss,
        "candidates": len(table),
        "solver": "probe",
    }
