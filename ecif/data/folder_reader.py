"""The one reader of embedding folders: which rows count, which column holds the ids.

``EmbeddingSet.load``, ``ecif score`` (``ecif.audit.shards``), the app and the pair-image
reader all read a folder (``docs/formats.md``, layout in ``ecif.data.layout``) through here,
so they agree on two rules:

- **Usable rows**: those whose ``status`` is ``"ok"`` or ``"success"`` (img2dataset's word,
  which clip-retrieval keeps); a folder without a ``status`` column keeps every row.
- **Ids**: the column ``id_col`` when given (it must exist); else the first of the
  manifest's ``id_column``, ``key``, ``uid``, ``id``, ``image_path``, ``path`` that is present,
  non-null and unique over the usable rows; else none, and a row's id is its position among
  the folder's usable rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecif import atomic
from ecif.data.layout import FolderError, list_parts, part_paths, read_manifest
from ecif.data.norms import UnnormalisedRowsWarning, off_unit_norms, unit_note, unit_rows
from ecif.paths import cache_dir

log = logging.getLogger(__name__)

OK_VALUES = ("ok", "success")  # "success": img2dataset's word, kept by clip-retrieval
ID_CANDIDATES = ("key", "uid", "id", "image_path", "path")


@dataclass
class FolderRows:
    """What ``read_folder`` returns: the usable rows (all rows with ``keep_failed``)."""

    image: np.ndarray
    text: np.ndarray
    metadata: pd.DataFrame  # one row per returned row, index 0..n-1
    part: np.ndarray  # the part each row comes from
    ids: np.ndarray | None  # None: no id column, ids are row positions
    id_column: str | None
    manifest: dict[str, Any] | None
    dropped: int  # rows left out because their status is not ok


def ok_mask(meta: pd.DataFrame) -> np.ndarray:
    """Which metadata rows are usable (status ``ok`` or ``success``; all without a status)."""
    if "status" not in meta.columns:
        return np.ones(len(meta), dtype=bool)
    return meta["status"].astype(str).isin(OK_VALUES).to_numpy()


def read_part(folder: str | os.PathLike, n: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Part ``n``: (image, text) memory-mapped and its metadata, checked to agree in rows."""
    return read_part_arrays(folder, n, part_paths(Path(folder), n)[:2], "embeddings")


def read_part_arrays(
    folder: str | os.PathLike, n: int, paths: Sequence[Path], what: str
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Part ``n``'s two row-aligned arrays at ``paths`` (memory-mapped; ``what`` names them
    in errors, e.g. ``"features"``) and its metadata, checked to agree in rows."""
    img_p, txt_p = paths
    meta_p = part_paths(Path(folder), n)[2]
    for p in (img_p, txt_p):
        if not p.exists():
            raise FolderError(f"{p}: missing (part {n} has metadata but no {what})")
    img, txt = _open_npy(img_p), _open_npy(txt_p)
    meta = pd.read_parquet(meta_p)
    if not (len(img) == len(txt) == len(meta)):
        raise FolderError(
            f"part {n} rows disagree: {img_p.name} {len(img)}, {txt_p.name} {len(txt)}, "
            f"{meta_p.name} {len(meta)}"
        )
    if what == "embeddings":  # CLIP's rows are unit: any reader of this part rescales alike
        offs = off_unit_norms((img, txt), among=np.nonzero(ok_mask(meta))[0])
        if any(offs):
            note = unit_note(f"{Path(folder)}: embeddings")
            warnings.warn(note, UnnormalisedRowsWarning, stacklevel=2)
            img, txt = (unit_rows(a) if o else a for a, o in zip((img, txt), offs))
    return img, txt, meta


class IdColumnWarning(UserWarning):
    """The manifest's id column repeats: the ids fall back to row positions."""


def pick_id_column(
    meta: pd.DataFrame, id_col: str | None, manifest: dict | None, folder: str | os.PathLike
) -> str | None:
    """The id column of ``meta`` (the usable rows) by the rule above; None: row positions."""
    if id_col is not None:
        if id_col not in meta.columns:
            raise FolderError(
                f"{folder}: id column {id_col!r} not in metadata {list(meta.columns)}"
            )
        return id_col
    named = [manifest["id_column"]] if manifest and manifest.get("id_column") else []
    candidates = named + list(ID_CANDIDATES)
    for c in candidates:
        # unique as text too: 1000 in one shard and "1000" in another are one id in a CSV
        if c in meta.columns and meta[c].notna().all() and meta[c].astype(str).is_unique:
            return c
    named = [c for c in named if c in meta.columns]
    if named:  # the manifest names ids that repeat: say so, a list of positions is no key
        ids = meta[named[0]]
        text = ids.astype(str)
        why = (
            f"{text[text.duplicated()].iloc[0]!r} repeats; shards of two crawls?"
            if ids.notna().all()
            else f"{int(ids.isna().sum())} are null"
        )
        warnings.warn(
            IdColumnWarning(
                f"{folder}: the id column {named[0]!r} is not unique over the usable rows "
                f"({why}); ids are row positions instead "
                "(pass an id column that is unique, or re-embed with unique keys)"
            ),
            stacklevel=2,
        )
    log.info("%s: no unique id column among %s; using row positions", folder, candidates)
    return None


def folder_id_column(folder: str | os.PathLike, id_col: str | None = None) -> str | None:
    """The id column ``read_folder`` would use, from the metadata files alone."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    manifest = read_manifest(folder)
    named = [id_col] if id_col else [(manifest or {}).get("id_column"), *ID_CANDIDATES]
    metas = []
    for n in list_parts(folder):
        path = part_paths(folder, n)[2]
        have = pq.read_schema(path).names
        metas.append(pd.read_parquet(path, columns=[c for c in have if c in (*named, "status")]))
    if not metas:
        return None
    meta = pd.concat(metas, ignore_index=True)
    return pick_id_column(meta[ok_mask(meta)], id_col, manifest, folder)


def read_folder(
    folder: str | os.PathLike,
    *,
    keep_failed: bool = False,
    id_col: str | None = None,
    in_memory_limit: int = 1 << 30,
    dtype: Any = None,
) -> FolderRows:
    """The rows of an embedding folder, parts in numeric order.

    One part with nothing dropped stays memory-mapped; otherwise the rows are gathered into
    RAM up to ``in_memory_limit`` bytes, else into one memory-mapped file under the ecif
    cache. ``dtype`` (e.g. ``np.float32``): always gather into RAM, in that dtype.
    """
    return read_arrays(
        folder,
        lambda n: part_paths(Path(folder), n)[:2],
        keep_failed=keep_failed,
        id_col=id_col,
        in_memory_limit=in_memory_limit,
        dtype=dtype,
    )


def read_arrays(
    folder: str | os.PathLike,
    paths_of: Callable[[int], Sequence[Path]],
    *,
    what: str = "embeddings",
    tags: tuple[str, str] = ("img", "text"),
    keep_failed: bool = False,
    id_col: str | None = None,
    in_memory_limit: int = 1 << 30,
    dtype: Any = None,
) -> FolderRows:
    """``read_folder`` over any two row-aligned arrays per part: ``paths_of(n)`` gives part
    ``n``'s (image, text) files (the embeddings, or the feature cache of
    ``ecif.data.features``); the same parts, rows, order and ids as the embeddings.
    ``what`` names the arrays in errors, ``tags`` the consolidated files in the cache."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderError(f"{folder}: no such folder")
    parts = list_parts(folder)
    if not parts:
        raise FolderError(
            f"{folder}: no metadata/metadata_{{N}}.parquet files; not an embedding folder"
        )
    imgs, txts, metas = [], [], []
    d_img = d_txt = first = None
    for n in parts:
        img_p, txt_p = paths_of(n)
        img, txt, meta = read_part_arrays(folder, n, (img_p, txt_p), what)
        if d_img is None:
            d_img, d_txt, first = img.shape[1], txt.shape[1], n
        elif img.shape[1] != d_img or txt.shape[1] != d_txt:
            raise FolderError(
                f"{img_p if img.shape[1] != d_img else txt_p}: width "
                f"{img.shape[1] if img.shape[1] != d_img else txt.shape[1]} differs from part "
                f"{first} (image {d_img}, text {d_txt}); mixed models in one folder?"
            )
        imgs.append(img)
        txts.append(txt)
        metas.append(meta)
    meta = pd.concat(metas, ignore_index=True) if len(metas) > 1 else metas[0]
    part = np.repeat(np.asarray(parts), [len(m) for m in metas])
    keep = np.ones(len(meta), dtype=bool) if keep_failed else ok_mask(meta)
    image = _gather(imgs, keep, folder, tags[0], in_memory_limit, dtype)
    text = _gather(txts, keep, folder, tags[1], in_memory_limit, dtype)
    if not keep.all():
        meta = meta[keep].reset_index(drop=True)
    manifest = read_manifest(folder)
    column = pick_id_column(meta, id_col, manifest, folder)
    return FolderRows(
        image=image,
        text=text,
        metadata=meta,
        part=part[keep],
        ids=None if column is None else meta[column].to_numpy(),
        id_column=column,
        manifest=manifest,
        dropped=int((~keep).sum()),
    )


def _open_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:  # truncated or not an .npy file
        raise FolderError(f"{path}: cannot be read as .npy ({e})") from e
    if arr.ndim != 2:
        raise FolderError(f"{path}: expected a 2-D array, got shape {arr.shape}")
    return arr


def _gather(
    arrays: Sequence[np.ndarray],
    keep: np.ndarray,
    folder: Path,
    tag: str,
    limit: int,
    dtype: Any = None,
) -> np.ndarray:
    if len(arrays) == 1 and keep.all():
        return arrays[0] if dtype is None else np.asarray(arrays[0], dtype=dtype)
    total = int(keep.sum())
    d = arrays[0].shape[1]
    kind = np.result_type(*arrays)  # a part rescaled to unit rows is float32 beside float16
    path = tmp = None
    if dtype is not None or total * d * kind.itemsize <= limit:
        out = np.empty((total, d), dtype=dtype or kind)
    else:
        path = _consolidated_path(folder, tag, keep)
        if path.exists():  # same folder files, same rows kept: made by an earlier load
            return np.load(path, mmap_mode="r")
        tmp = atomic.tmp_name(path)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=kind, shape=(total, d))
    start = row = 0
    for arr in arrays:
        m = keep[start : start + len(arr)]
        for s in range(0, len(arr), 65536):
            block = np.asarray(arr[s : s + 65536])[m[s : s + 65536]]
            out[row : row + len(block)] = block
            row += len(block)
        start += len(arr)
    if path is not None:
        out.flush()
        del out
        atomic.publish(tmp, path)
        return np.load(path, mmap_mode="r")
    return out


def _consolidated_path(folder: Path, tag: str, keep: np.ndarray) -> Path:
    """A writable memmap in the ecif cache for folders too large to gather in RAM."""
    stamp = [str(folder.resolve())] + [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.glob("*/*"))
    ]
    stamp.append(hashlib.sha256(np.packbits(keep).tobytes()).hexdigest())
    stamp.append("unit rows")  # caches from before parts were rescaled on reading: not reused
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    path = cache_dir() / "consolidated" / digest / f"{tag}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
