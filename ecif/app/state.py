"""Streamlit-side caches: tables behind st.cache_data, heavy objects behind st.cache_resource.

The audit folder comes from the sidebar (default: $ECIF_AUDIT, or the first script argument
that `ecif app` passes after ``--``). Pages call ``audit()``; it stops the page with a clear
``st.error`` when the folder is not a usable audit.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pandas as pd
import streamlit as st

from ecif.app import detail, support
from ecif.audit.folder import AuditFolderError
from ecif.audit.recorded import audit_notes

FOLDER_KEY = "audit_folder"
DATA_ROOT_KEY = "data_root"


def default_folder() -> str:
    if os.environ.get(support.AUDIT_ENV):
        return os.environ[support.AUDIT_ENV]
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return args[0] if args else "ecif-demo"


def folder() -> str:
    return str(st.session_state.get(FOLDER_KEY) or default_folder())


def data_root() -> str:
    """Where the input shards are now, if they moved (sidebar; `ecif app --data-root`)."""
    return str(st.session_state.get(DATA_ROOT_KEY) or os.environ.get(support.DATA_ROOT_ENV) or "")


def audit_warnings(info: dict[str, Any]) -> list[str]:
    """What the audit itself warned about (its inputs, its fits and solves)."""
    return audit_notes(info)


@st.cache_data(show_spinner="Reading the audit table…", max_entries=4)
def _table(folder: str, stamp: float) -> tuple[pd.DataFrame, dict[str, Any]]:
    return support.load_audit(folder)


def audit() -> tuple[pd.DataFrame, dict[str, Any]]:
    """The current audit's table and info, or an st.error and a stopped page."""
    f = folder()
    try:
        return _table(f, support.audit_stamp(f))
    except (AuditFolderError, OSError, ValueError) as e:
        st.error(f"Cannot open the audit: {e}")
        st.info("Give an audit folder (written by `ecif demo` or `ecif score`) in the sidebar.")
        st.stop()
        raise  # unreachable; st.stop raises


@st.cache_data(max_entries=4)
def _reviewed(folder: str, stamp: float) -> pd.DataFrame:
    return support.read_reviewed(folder)


def reviewed(f: str) -> pd.DataFrame:
    path = os.path.join(f, support.REVIEWED_FILE)
    return _reviewed(f, os.path.getmtime(path) if os.path.exists(path) else 0.0)


@st.cache_data(show_spinner=False, max_entries=4)
def sources(embeddings: str | None, root: str = "") -> pd.Series:
    return support.id_sources(embeddings, root or None)


@st.cache_resource(show_spinner=False, max_entries=64)
def _image_shard(path: str, id_col: str | None) -> support.ImageShard:
    return support.open_image_shard(path, id_col)


@st.cache_data(show_spinner=False, max_entries=4096)
def _shard_thumbs(path: str, id_col: str | None, ids: tuple, size: int) -> list[bytes | None]:
    shard = _image_shard(path, id_col)
    return [support.thumbnail(b, size) for b in support.read_images(shard, list(ids))]


def thumbnails(
    info: dict[str, Any], ids: list[Any], size: int = 96
) -> tuple[list[bytes | None], list[str]]:
    """PNG thumbnails for these ids (only these are read) and the problems met on the way."""
    src = sources(info.get("embeddings"), data_root())
    id_col = info.get("source_id_column") or info.get("id_column")  # the input shards' name
    out: list[bytes | None] = [None] * len(ids)
    problems: list[str] = []
    if src.empty:
        emb = info.get("embeddings")
        why = f"{emb} not found" if emb else "audit.json records no training embeddings"
        return out, [f"no image sources: {why}"]
    by_shard: dict[str, list[int]] = {}
    for j, i in enumerate(ids):
        if i in src.index and src[i]:
            by_shard.setdefault(str(src[i]), []).append(j)
    for path, js in by_shard.items():
        try:
            thumbs = _shard_thumbs(path, id_col, tuple(ids[j] for j in js), size)
        except Exception as e:  # a moved/deleted/unreadable shard: say so, keep going
            root = data_root()
            if root and not os.path.exists(path):  # the recorded path, and not under the root
                e = f"{e}; not under the image data folder {root} either"
            problems.append(str(e))
            continue
        for j, t in zip(js, thumbs, strict=True):
            out[j] = t
    if any(t is None for t in out) and not problems:
        problems.append(f"{sum(t is None for t in out)} image(s) missing or undecodable")
    return out, problems


@st.cache_resource(show_spinner="Loading the training embeddings…", max_entries=2)
def training_set(embeddings: str):
    from ecif.audit.shards import load_training_set

    return load_training_set(embeddings)


@st.cache_resource(show_spinner=False, max_entries=2)
def heads(folder: str, stamp: float):
    return detail.load_heads(folder)


@st.cache_resource(show_spinner=False, max_entries=2)
def indexes(folder: str):
    from ecif.data.index import load_indexes

    if not os.path.exists(os.path.join(folder, "index", "image.faiss")):
        return None
    return load_indexes(os.path.join(folder, "index"))


@st.cache_resource(show_spinner="Preparing trace-back (head, solver, indexes)…", max_entries=2)
def traceback(folder: str, stamp: float):
    from ecif.audit.trace import TraceBack

    return TraceBack.from_audit(folder)


@st.cache_resource(show_spinner=False, max_entries=4)
def test_set(path: str):
    from ecif.data.embedding_set import EmbeddingSet

    return EmbeddingSet.load(path)


def show_thumbs(info: dict[str, Any], ids: list[Any], captions: list[str], width: int = 96) -> None:
    """A gallery of real <img> thumbnails with captions; missing images are named."""
    thumbs, problems = thumbnails(info, ids, size=width)
    for p in problems:
        st.warning(f"Images: {p}")
    shown = [(t, c) for t, c in zip(thumbs, captions, strict=True) if t is not None]
    if shown:
        st.image([t for t, _ in shown], caption=[c for _, c in shown], width=width)
