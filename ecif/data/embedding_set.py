"""EmbeddingSet: image and text embeddings of N pairs, row-aligned, with ids."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecif._version import __version__
from ecif.data import layout
from ecif.data.folder_reader import read_folder
from ecif.data.norms import (  # noqa: F401  (NOT_UNIT: re-exported)
    NOT_UNIT,
    describe_off,
    off_unit_norms,
    unit_note,
    unit_rows,
)

log = logging.getLogger(__name__)


class EmbeddingSetError(ValueError):
    """Raised for embeddings that cannot be audited (shape, NaN, ids)."""


class EmbeddingSet:
    """Row-aligned image/text embeddings of N pairs.

    ``image`` and ``text`` are (N, d) arrays (numpy, memory-mapped or not, or anything
    array-like). ``ids`` default to ``0..N-1``. ``metadata`` is an optional DataFrame with one
    row per pair (caption, url, status, ...), kept alongside and never reordered.

    ``logit_scale``: the embedding model's temperature exp(logit_scale), the ``t`` of the
    head's ``S_ij = t x_i^T M y_j``. ``EmbeddingSet.load`` reads it from the folder's
    manifest. Built from arrays it is None unless given, and ``ecif.fit`` then uses **100**
    (OpenAI CLIP's trained value, also the cap open_clip trains towards); pass the model's own,
    e.g. ``EmbeddingSet(img, txt, ids=ids, logit_scale=model.logit_scale.exp().item())``, or
    ``ecif.fit(..., logit_scale=...)``. Subsets keep it.
    ``source`` (the folder ``load`` read, absolute) and ``model`` (the manifest's
    ``{"model", "pretrained"}``) say where the embeddings came from; None when unknown.
    """

    logit_scale: float | None = None
    source: str | None = None
    model: dict[str, Any] | None = None

    def __init__(
        self,
        image: Any,
        text: Any,
        ids: Sequence[Any] | np.ndarray | None = None,
        metadata: pd.DataFrame | None = None,
        *,
        check_finite: bool = True,
        logit_scale: float | None = None,
    ) -> None:
        image = image if isinstance(image, np.ndarray) else np.asarray(image)
        text = text if isinstance(text, np.ndarray) else np.asarray(text)
        for name, arr in (("image", image), ("text", text)):
            if arr.ndim != 2:
                raise EmbeddingSetError(
                    f"{name} embeddings must be 2-D (N, d); got shape {arr.shape}"
                )
            if not np.issubdtype(arr.dtype, np.floating):
                raise EmbeddingSetError(
                    f"{name} embeddings must be floating point; got {arr.dtype}"
                )
        if image.shape[0] != text.shape[0]:
            raise EmbeddingSetError(
                f"image and text have different numbers of rows: {image.shape[0]} vs {text.shape[0]}"
            )
        n = image.shape[0]
        if ids is None:
            ids = np.arange(n)
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) != n:
            raise EmbeddingSetError(f"ids must be 1-D with {n} entries; got shape {ids.shape}")
        if len(pd.unique(ids)) != n:
            dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[:5].tolist()
            raise EmbeddingSetError(f"ids must be unique; duplicated: {dup}")
        if metadata is not None and len(metadata) != n:
            raise EmbeddingSetError(f"metadata has {len(metadata)} rows, embeddings have {n}")
        if check_finite:
            found = [
                f"{name} embeddings in {len(bad)} rows (first ids: {ids[bad[:5]].tolist()})"
                for name, bad in (
                    ("image", _nonfinite_rows(image)),
                    ("text", _nonfinite_rows(text)),
                )
                if len(bad)
            ]
            if found:
                raise EmbeddingSetError(
                    f"NaN or inf in {' and '.join(found)}; drop or re-embed those rows"
                )
        self.image = image
        self.text = text
        self.ids = ids
        self.metadata = metadata
        if logit_scale is not None:
            if not float(logit_scale) > 0:
                raise EmbeddingSetError(f"logit_scale must be positive; got {logit_scale}")
            self.logit_scale = float(logit_scale)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __repr__(self) -> str:
        return f"EmbeddingSet(n={len(self)}, d_image={self.d_image}, d_text={self.d_text})"

    @property
    def d_image(self) -> int:
        return int(self.image.shape[1])

    @property
    def d_text(self) -> int:
        return int(self.text.shape[1])

    def subset(self, rows: Sequence[int] | np.ndarray) -> EmbeddingSet:
        """A new set with the given row positions (in that order)."""
        rows = np.asarray(rows)
        meta = None if self.metadata is None else self.metadata.iloc[rows].reset_index(drop=True)
        out = EmbeddingSet(
            np.asarray(self.image[rows]),
            np.asarray(self.text[rows]),
            self.ids[rows],
            meta,
            check_finite=False,
        )
        out.logit_scale, out.model = self.logit_scale, self.model
        return out

    def positions(self, ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Row positions of the given ids; a clear error names ids that are not in the set."""
        index = pd.Index(self.ids)
        wanted = np.asarray(ids)
        pos = index.get_indexer(wanted)
        if (pos < 0).any():
            missing = wanted[pos < 0][:5].tolist()
            raise KeyError(f"{int((pos < 0).sum())} ids are not in this set, e.g. {missing}")
        return pos

    @classmethod
    def load(
        cls, folder: str | Any, *, keep_failed: bool = False, id_col: str | None = None
    ) -> EmbeddingSet:
        """Read a clip-retrieval embedding folder (``ecif embed`` output or clip-retrieval's own),
        memory-mapped. Rows whose ``status`` is not ``"ok"`` are dropped (count logged) unless
        ``keep_failed``. See ``load_folder`` and ``ecif.data.folder_reader``."""
        return load_folder(folder, keep_failed=keep_failed, id_col=id_col)

    def save(self, folder: str | Any, *, part_rows: int = 1_000_000) -> Any:
        """Write this set in the clip-retrieval layout (float16) plus a manifest."""
        return save_folder(self, folder, part_rows=part_rows)

    def split(self, fraction: float, seed: int = 0) -> tuple[EmbeddingSet, EmbeddingSet]:
        """Random split into (rest, held_out) with ``fraction`` of rows held out."""
        if not 0.0 < fraction < 1.0:
            raise ValueError("fraction must be in (0, 1)")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(self))
        k = max(1, int(round(fraction * len(self))))
        return self.subset(np.sort(perm[k:])), self.subset(np.sort(perm[:k]))


def as_unit(es: EmbeddingSet, name: str) -> tuple[EmbeddingSet, str | None]:
    """``es`` with unit rows, and the warning when they had to be divided by their norms (a
    copy then, only the side found off rescaled; ``es`` itself when its rows are unit). The
    head starts at CLIP's cosine logits and its temperature is calibrated for unit rows; raw
    features (an ``encode_image`` without ``normalize=True``) would skew both without any
    error. Checks up to 10,000 evenly spaced rows (a memory-mapped set is not read whole).
    A set read from a folder (``source``) is left as read: the folder reader decided part by
    part, as every other reader of that folder does, and a second look at other sampled
    rows could decide otherwise."""
    if len(es) == 0 or es.source is not None:
        return es, None
    offs = off_unit_norms((es.image, es.text))
    if not any(offs):
        return es, None
    image, text = (unit_rows(a) if o else a for a, o in zip((es.image, es.text), offs))
    out = EmbeddingSet(image, text, es.ids, es.metadata, check_finite=False)
    out.logit_scale, out.model = es.logit_scale, es.model  # source: None, as checked
    return out, unit_note(f"{name} embeddings", describe_off(offs))


def load_folder(
    folder: str | os.PathLike,
    *,
    keep_failed: bool = False,
    id_col: str | None = None,
    in_memory_limit: int = 1 << 30,
) -> EmbeddingSet:
    """Load a clip-retrieval embedding folder as an EmbeddingSet (``ecif.data.folder_reader``).

    A single part with no dropped rows stays memory-mapped. Several parts (or dropped rows)
    are gathered into RAM when they fit in ``in_memory_limit`` bytes, else into one
    memory-mapped file under the ecif cache. Rows whose ``status`` is neither ``"ok"`` nor
    ``"success"`` are dropped unless ``keep_failed`` (their embeddings are zeros); the count
    is logged. The metadata gains a ``part`` column (each row's part) so that an in-memory
    audit keeps its batches inside parts, as ``ecif score`` does.
    """
    rows = read_folder(
        folder, keep_failed=keep_failed, id_col=id_col, in_memory_limit=in_memory_limit
    )
    if rows.dropped:
        n = rows.dropped + len(rows.metadata)
        msg = f"{folder}: dropped {rows.dropped} of {n} rows whose status is not ok"
        log.warning(msg + " (keep_failed=True keeps them)")
    meta = rows.metadata.copy()
    meta["part"] = rows.part  # the shard of each row: an audit's batches stay inside shards
    es = EmbeddingSet(rows.image, rows.text, ids=rows.ids, metadata=meta)
    manifest = rows.manifest
    if manifest and manifest.get("logit_scale"):
        es.logit_scale = float(manifest["logit_scale"])
    es.source = str(Path(folder).resolve())
    es.model = layout.model_identity(manifest)
    return es


def save_folder(es: EmbeddingSet, folder: str | os.PathLike, *, part_rows: int = 1_000_000) -> Path:
    """Write an EmbeddingSet in the clip-retrieval layout (float16), ``part_rows`` per part."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = es.metadata.copy() if es.metadata is not None else pd.DataFrame(index=range(len(es)))
    meta = meta.drop(columns="part", errors="ignore")  # re-derived from the layout on load
    id_column = "id"
    if "id" not in meta.columns:
        meta.insert(0, "id", es.ids)
    elif not np.array_equal(meta["id"].to_numpy(), es.ids):
        id_column = "ecif_id"
        meta.insert(0, id_column, es.ids)
    if "status" not in meta.columns:
        meta["status"] = layout.STATUS_OK
    counts = []
    for n, start in enumerate(range(0, max(len(es), 1), part_rows)):
        sl = slice(start, start + part_rows)
        layout.write_part(
            folder, n, es.image[sl], es.text[sl], meta.iloc[sl], {"id_column": id_column}
        )
        counts.append(len(meta.iloc[sl]))
    layout.write_manifest(
        folder,
        {
            "ecif_version": __version__,
            "id_column": id_column,
            "dims": {"image": es.d_image, "text": es.d_text},
            "logit_scale": es.logit_scale,
            "rows": {"total": len(es), "ok": int((meta["status"] == layout.STATUS_OK).sum())},
            "parts": [{"index": i, "rows": c} for i, c in enumerate(counts)],
        },
    )
    return folder


def _nonfinite_rows(arr: np.ndarray, chunk: int = 65536) -> np.ndarray:
    bad = []
    for start in range(0, arr.shape[0], chunk):
        block = np.asarray(arr[start : start + chunk])
        rows = np.nonzero(~np.isfinite(block).all(axis=1))[0]
        bad.append(rows + start)
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def fingerprint(data: EmbeddingSet | None, groups: np.ndarray | None = None) -> str | None:
    """A digest of a set's rows in order (embeddings as float32, ids, and ``groups``: the
    shard of each row, which decides the batches). About 1 s a GB read from memory."""
    if data is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for arr in (data.image, data.text):
        a = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
        h.update(str(a.shape).encode())
        h.update(memoryview(a).cast("B"))
    h.update("\x1f".join(map(str, data.ids)).encode())
    if groups is not None:
        h.update(np.ascontiguousarray(np.asarray(groups, dtype=np.int64)).tobytes())
    return h.hexdigest()
