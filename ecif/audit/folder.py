"""The audit folder: what `ecif demo` and `ecif score` write and the app opens.

AUDIT/audit.json          what was run (model, method, options, version, counts, paths)
AUDIT/scores.parquet      the audit table (or scores/<shard>.parquet, one per input shard)
AUDIT/head.pt             the fitted head(s), to trace and refit without refitting
AUDIT/index/              FAISS indexes over the training embeddings (trace-back)
AUDIT/reviewed.parquet    ids a person marked as reviewed in the app
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ecif.atomic import (
    atomic_path,
    read_parquet_meta,  # noqa: F401  (also ecif.audit.folder.read_parquet_meta)
    write_json,
    write_parquet_atomic,
)
from ecif.data.embedding_set import EmbeddingSet, fingerprint
from ecif.engine.head import Head


class AuditFolderError(ValueError):
    """The folder is not an audit folder, or is incomplete."""


INFLUENCE_PARTS = ("influence", "influence_pos", "influence_neg")


def params_of(info: dict) -> str:
    """The part an audit's record says influence went through: "head", "projection", "lora"."""
    return (info.get("options") or {}).get("params") or "head"


def read_audit_info(folder: str | os.PathLike) -> dict[str, Any]:
    """An audit folder's audit.json, or an AuditFolderError that says what is wrong with it
    (missing, not JSON: a run cut off while writing, or edited by hand)."""
    path = Path(folder) / "audit.json"
    if not path.exists():
        raise AuditFolderError(
            f"{folder}: not an audit folder (no audit.json); run `ecif demo` or `ecif score`"
        )
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AuditFolderError(
            f"{path}: not readable as JSON ({e}); run `ecif score` again to rewrite it"
        ) from None
    if not isinstance(info, dict):
        raise AuditFolderError(f"{path}: holds a {type(info).__name__}, not an audit's record")
    for key, kinds in (("options", dict), ("embeddings", str), ("scores", str)):
        if info.get(key) is not None and not isinstance(info[key], kinds):
            raise AuditFolderError(
                f"{path}: {key!r} is a {type(info[key]).__name__}, not a {kinds.__name__}"
            )
    return info


def audit_params(folder: str | os.PathLike) -> str:
    """``params_of`` an audit folder's audit.json (a clear error when there is none)."""
    return params_of(read_audit_info(folder))


def float32_scores(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for col in ("clip_score", "influence", "influence_pos", "influence_neg", "misalign_score"):
        if col in out:
            out[col] = out[col].astype(np.float32)
    return out


def write_audit(
    folder: str | os.PathLike,
    table: pd.DataFrame,
    info: dict[str, Any],
    heads: list[Head] | None = None,
    id_column: str = "id",
    embeddings: str | os.PathLike | None = None,
) -> Path:
    """Write the audit table, its description and the fitted heads into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = float32_scores(table)
    if id_column != "id" and "id" in out:
        out = out.rename(columns={"id": id_column})
    write_parquet_atomic(folder / "scores.parquet", out, info)
    write_audit_description(
        folder, info, heads or [], embeddings, None, id_column, "scores.parquet"
    )
    return folder


def read_audit(folder: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The audit table and its description; a clear error when the folder is not an audit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AuditFolderError(f"{folder}: no such folder")
    info = read_audit_info(folder)
    scores = folder / (info.get("scores") or "scores.parquet")
    id_col = info.get("id_column", "id")
    if scores.is_dir():
        files = sorted(scores.glob("*.parquet"))
        if not files:
            raise AuditFolderError(f"{scores}: no score shards")
        table = pd.concat([_scores(f, id_col) for f in files], ignore_index=True)
    elif scores.exists():
        table = _scores(scores, id_col)
    else:
        raise AuditFolderError(f"{folder}: audit.json names {scores.name}, which is missing")
    if id_col in table.columns and id_col != "id":
        table = table.rename(columns={id_col: "id"})
    return table, info


# what every reader of an audit table (clean, export, the app, trace) takes for granted
TABLE_COLUMNS = ("misalign_score", "is_misaligned", "clip_score")


def _check_columns(table: pd.DataFrame, scores: Path, id_col: str) -> None:
    """A score table edited by hand or by another tool may lack a column the verbs read (a
    KeyError deep in `ecif clean` before); say which, once, where it is read."""
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if id_col not in table.columns and "id" not in table.columns:
        missing.insert(0, id_col)
    if missing:
        raise AuditFolderError(
            f"{scores}: the score table lacks {', '.join(map(repr, missing))}; it was changed "
            "after `ecif score` wrote it: run `ecif score` again"
        )


def influence_columns(table: pd.DataFrame) -> list[str]:
    """The influence columns worth showing of an audit table: one scored by self-influence
    (no validation set) has only NaN in the influence parts, so ``self_influence`` instead."""
    if "influence" in table and table["influence"].notna().any():
        return [c for c in INFLUENCE_PARTS if c in table]
    return ["self_influence"] if "self_influence" in table else []


def read_heads(folder: str | os.PathLike) -> list[Head]:
    path = Path(folder) / "head.pt"
    if not path.exists():
        if (Path(folder) / "model.pt").exists():
            raise AuditFolderError(
                f"{folder}: an audit in a model mode (model.pt, no head); cleaning by refits, "
                "the breakdown and trace queries from files or free text are built for the head "
                "mode only (rerun `ecif score` without --params for them; `ecif verify` and "
                "`ecif trace --query-id` work in both)"
            )
        raise AuditFolderError(f"{folder}: no head.pt (the fitted head); rerun the audit")
    return [Head.from_state_dict(sd) for sd in _load_states(path)]


def read_models(folder: str | os.PathLike) -> list:
    """The fitted trainable parts of a model-mode audit (model.pt)."""
    from ecif.engine.encoder_model import EncoderModel

    path = Path(folder) / "model.pt"
    if not path.exists():
        raise AuditFolderError(f"{folder}: no model.pt (a model-mode audit's fitted part)")
    return [EncoderModel.from_state_dict(sd) for sd in _load_states(path)]


def _scores(path: Path, id_col: str) -> pd.DataFrame:
    """One score table, or an AuditFolderError (a shard cut off while written, or replaced,
    or lacking a column)."""
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise AuditFolderError(
            f"{path}: cannot be read as a score table ({str(e).splitlines()[0][:120]}); run "
            "`ecif score` again (finished shards are kept)"
        ) from None
    _check_columns(table, path, id_col)
    return table


def _load_states(path: Path) -> list:
    """The saved state dicts of head.pt / model.pt, or an AuditFolderError (a cut-off write)."""
    try:
        states = torch.load(path, weights_only=False)
    except Exception as e:  # pickle, zip and EOF errors all mean the same here
        raise AuditFolderError(
            f"{path}: cannot be read ({type(e).__name__}); run `ecif score` again to rewrite it"
        ) from None
    if not isinstance(states, list):
        raise AuditFolderError(f"{path}: holds a {type(states).__name__}, not a list of states")
    return states


def write_audit_description(
    folder: Path,
    meta: dict[str, Any],
    heads: list[Head],
    embeddings: Path | None,
    summary: pd.DataFrame | None = None,
    id_column: str = "key",
    scores: str = "scores",
) -> None:
    """audit.json and head.pt (model.pt in a model mode) for an audit whose scores are
    already written."""
    name = "model.pt" if heads and hasattr(heads[0], "part") else "head.pt"
    with atomic_path(folder / name) as tmp:
        torch.save([h.state_dict() for h in heads], tmp)
    desc = dict(meta)
    desc.update(id_column=id_column, scores=scores)
    if embeddings is not None:
        desc["embeddings"] = str(Path(embeddings).resolve())
    if summary is not None:
        desc["shards"] = summary.to_dict(orient="records")
    write_json(folder / "audit.json", desc)


def training_set(
    folder: Path, embeddings: str | os.PathLike | None = None
) -> tuple[EmbeddingSet, Path]:
    """The training embeddings of an audit: ``embeddings`` or audit.json's ``embeddings``."""
    info = read_audit_info(folder)
    emb = embeddings or info.get("embeddings") or info.get("train")
    if not emb:
        raise AuditFolderError(
            f"{folder}/audit.json records no training embeddings; pass --embeddings FOLDER"
        )
    emb = Path(emb)
    if not emb.is_absolute() and not emb.exists():
        emb = folder / emb
    data = EmbeddingSet.load(emb)
    want = (info.get("fingerprint") or {}).get("train")
    if embeddings is not None and want:  # another folder than the one scored: the same rows?
        part = data.metadata["part"].to_numpy() if "part" in data.metadata else None
        if fingerprint(data, part) != want:
            raise AuditFolderError(
                f"{emb}: not the rows this audit scored ({len(data):,} pairs whose embeddings, "
                "ids or order differ from the training set's recorded in audit.json); pass "
                "the training embeddings the audit was made from"
            )
    return data, emb


def trace_head(folder: Path, train: EmbeddingSet, *, fit_if_missing: bool = True) -> Head:
    """A head fit on the whole training set: the audit's own, or AUDIT/index/head.pt (what
    `ecif index` fits when the audit cross-fitted halves), else fit now with its options.
    Audits in a model mode (params != "head") have no head: their traces go through the fitted
    part (``ecif.audit.model_trace_pair``)."""
    params = audit_params(folder)
    if params != "head":
        raise AuditFolderError(
            f"{folder}: an audit in a model mode (params={params!r}) has no head; its traces go "
            "through the fitted part (`ecif trace` takes the same queries)"
        )
    for path in (folder, folder / "index"):
        if (path / "head.pt").exists():
            for h in read_heads(path):
                if h.partition.n == len(train):
                    return h
    if not fit_if_missing:
        raise AuditFolderError(f"{folder}: no head fit on all {len(train)} training pairs")
    from ecif.audit.auditor import AuditArgs, Auditor

    info = read_audit_info(folder)
    args = AuditArgs.from_record(info.get("options", {}))
    chosen = info.get("head_choice") or {}  # the audit's chosen scale and pull, not a new search
    head = Auditor(train, args=args).fit_head(
        train, logit_scale=chosen.get("logit_scale"), lam=chosen.get("lam")
    )
    with atomic_path(folder / "index" / "head.pt") as tmp:
        torch.save([head.state_dict()], tmp)
    return head
