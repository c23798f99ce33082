"""The clip-retrieval embedding folder: read it (memory-mapped) and write it part by part.

Layout: ``img_emb/img_emb_{N}.npy`` and ``text_emb/text_emb_{N}.npy`` (float16, unit norm) and
``metadata/metadata_{N}.parquet``, rows aligned by position, plus ecif's ``manifest.json``.
Folders that clip-retrieval wrote itself (no manifest, no ``status`` column) load as well.

Rows that could not be embedded keep their metadata row with ``status`` != ``"ok"`` and an
``error_message``; their embedding rows are all zeros. ``load_folder`` drops them by default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from ecif.data.embedding_set import EmbeddingSet

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATUS_OK = "ok"
OK_VALUES = (STATUS_OK, "success")  # "success": img2dataset's word, kept by clip-retrieval
ID_CANDIDATES = ("key", "uid", "id", "image_path", "path")
_PART = re.compile(r"^metadata_(\d+)\.parquet$")


class FolderError(ValueError):
    """An embedding folder that cannot be read; the message names the file."""


def part_paths(folder: Path, n: int) -> tuple[Path, Path, Path]:
    """(img, text, metadata) paths of part ``n``."""
    return (
        folder / "img_emb" / f"img_emb_{n}.npy",
        folder / "text_emb" / f"text_emb_{n}.npy",
        folder / "metadata" / f"metadata_{n}.parquet",
    )


def list_parts(folder: str | os.PathLike) -> list[int]:
    """Indices N of the finished parts (those whose metadata file exists), sorted."""
    meta = Path(folder) / "metadata"
    if not meta.is_dir():
        return []
    found = (_PART.match(p.name) for p in meta.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FolderError(f"{path}: not valid JSON ({e})") from e


def part_sources(
    folder: str | os.PathLike, data_root: str | os.PathLike | None = None
) -> dict[int, str]:
    """Part index -> the input shard it was embedded from, where that file is now.

    Tried in order: ``data_root`` (the folder that now holds the inputs: the shard's path
    under the manifest's ``input_root``, then its file name), the absolute ``source``, the
    path relative to the embedding folder (``source_relative``), and an old manifest's
    relative ``source`` taken from the embedding folder's parent. When none exists, the
    recorded ``source`` is returned (and opening it names the missing file).
    """
    folder = Path(folder)
    manifest = read_manifest(folder) or {}
    root = manifest.get("input_root")
    out = {}
    for p in manifest.get("parts", []):
        src = p.get("source") or ""
        if not src:
            continue
        tries = []
        if data_root:
            if root and Path(src).is_absolute() and Path(src).is_relative_to(root):
                tries.append(Path(data_root) / Path(src).relative_to(root))
            tries.append(Path(data_root) / Path(src).name)
        tries.append(Path(src) if Path(src).is_absolute() else folder / src)
        if p.get("source_relative"):
            tries.append(folder / p["source_relative"])
        if not Path(src).is_absolute():
            tries.append(folder.parent / src)
        found = next((t for t in tries if t.exists()), None)
        out[int(p["index"])] = str(found.resolve() if found else src)
    return out


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    path = Path(folder) / MANIFEST
    atomic_write_bytes(path, json.dumps(manifest, indent=1, default=str).encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = tmp_name(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tmp_name(path: Path) -> Path:
    """A temp name next to ``path``, hidden and unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def clean_stale_temps(folder: Path) -> int:
    """Remove temp files a killed run left behind; returns how many."""
    n = 0
    for sub in ("img_emb", "text_emb", "metadata", "."):
        d = folder / sub
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
    return n


def write_part(
    folder: str | os.PathLike,
    n: int,
    image: np.ndarray,
    text: np.ndarray,
    metadata: pd.DataFrame,
    kv_metadata: dict[str, str] | None = None,
) -> None:
    """Write part ``n`` whole: the two arrays first, the metadata file last (it marks done)."""
    folder = Path(folder)
    if not (len(image) == len(text) == len(metadata)):
        raise ValueError(f"part {n}: {len(image)} image, {len(text)} text, {len(metadata)} rows")
    img_p, txt_p, meta_p = part_paths(folder, n)
    for p, arr in ((img_p, image), (txt_p, text)):
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(p)
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(arr, dtype=np.float16))
        os.replace(tmp, p)
    publish_metadata(meta_p, metadata, kv_metadata)


def publish_metadata(
    path: Path, metadata: pd.DataFrame, kv_metadata: dict[str, str] | None = None
) -> None:
    """Write a part's metadata parquet atomically, with ecif's key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(metadata.reset_index(drop=True), preserve_index=False)
    if kv_metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({f"ecif.{k}".encode(): str(v).encode() for k, v in kv_metadata.items()})
        table = table.replace_schema_metadata(merged)
    tmp = tmp_name(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def part_kv(path: Path) -> dict[str, str]:
    """ecif key-value metadata of a finished part (empty for foreign folders)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return {k.decode()[5:]: v.decode() for k, v in meta.items() if k.decode().startswith("ecif.")}


def load_folder(
    folder: str | os.PathLike,
    *,
    keep_failed: bool = False,
    id_col: str | None = None,
    in_memory_limit: int = 1 << 30,
) -> EmbeddingSet:
    """Load a clip-retrieval embedding folder as an EmbeddingSet.

    A single part with no dropped rows stays memory-mapped. Several parts (or dropped rows)
    are gathered into RAM when they fit in ``in_memory_limit`` bytes, else into one
    memory-mapped file under the ecif cache. Rows whose ``status`` is not ``"ok"`` are
    dropped unless ``keep_failed`` (their embeddings are zeros); the count is logged.
    """
    from ecif.data.embedding_set import EmbeddingSet

    folder = Path(folder)
    if not folder.is_dir():
        raise FolderError(f"{folder}: no such folder")
    parts = list_parts(folder)
    if not parts:
        raise FolderError(
            f"{folder}: no metadata/metadata_{{N}}.parquet files; not an embedding folder"
        )
    imgs, txts, metas = [], [], []
    d_img = d_txt = None
    for n in parts:
        img_p, txt_p, meta_p = part_paths(folder, n)
        for p in (img_p, txt_p):
            if not p.exists():
                raise FolderError(f"{p}: missing (part {n} has metadata but no embeddings)")
        img = _open_npy(img_p)
        txt = _open_npy(txt_p)
        meta = pd.read_parquet(meta_p)
        if not (len(img) == len(txt) == len(meta)):
            raise FolderError(
                f"part {n} rows disagree: {img_p.name} {len(img)}, {txt_p.name} {len(txt)}, "
                f"{meta_p.name} {len(meta)}"
            )
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
    keep = np.ones(len(meta), dtype=bool)
    if "status" in meta.columns and not keep_failed:
        keep = meta["status"].isin(OK_VALUES).to_numpy()
        dropped = int((~keep).sum())
        if dropped:
            msg = f"{folder}: dropped {dropped} of {len(meta)} rows whose status is not ok"
            log.warning(msg + " (keep_failed=True keeps them)")
    image = _gather(imgs, keep, folder, "img", in_memory_limit)
    text = _gather(txts, keep, folder, "text", in_memory_limit)
    meta = meta[keep].reset_index(drop=True) if not keep.all() else meta
    manifest = read_manifest(folder)
    ids = _pick_ids(meta, id_col, manifest, folder)
    es = EmbeddingSet(image, text, ids=ids, metadata=meta)
    if manifest and manifest.get("logit_scale"):
        es.logit_scale = float(manifest["logit_scale"])
    es.source = str(folder.resolve())
    es.model = model_identity(manifest)
    return es


def model_identity(manifest: dict | None) -> dict[str, Any] | None:
    """``{"model", "pretrained"}`` of the model that wrote a folder; None when unrecorded."""
    if not manifest or not manifest.get("model"):
        return None
    return {"model": manifest["model"], "pretrained": manifest.get("pretrained") or None}


def model_label(model: str | dict | None, pretrained: str | None = None) -> str:
    """How messages name a model: ``ViT-B-32 (pretrained laion2b_s34b_b79k)``, or the bare
    name for local-dir: and ecif-tiny models, which have no tag."""
    if isinstance(model, dict):
        model, pretrained = model.get("model"), model.get("pretrained")
    if not model:
        return "an unrecorded model"
    return f"{model} (pretrained {pretrained})" if pretrained else str(model)


def _open_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:  # truncated or not an .npy file
        raise FolderError(f"{path}: cannot be read as .npy ({e})") from e
    if arr.ndim != 2:
        raise FolderError(f"{path}: expected a 2-D array, got shape {arr.shape}")
    return arr


def _gather(
    arrays: Sequence[np.ndarray], keep: np.ndarray, folder: Path, tag: str, limit: int
) -> np.ndarray:
    if len(arrays) == 1 and keep.all():
        return arrays[0]
    total = int(keep.sum())
    d = arrays[0].shape[1]
    path = tmp = None
    if total * d * arrays[0].dtype.itemsize <= limit:
        out = np.empty((total, d), dtype=arrays[0].dtype)
    else:
        path = _consolidated_path(folder, tag, keep)
        if path.exists():  # same folder files, same rows kept: made by an earlier load
            return np.load(path, mmap_mode="r")
        tmp = tmp_name(path)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=arrays[0].dtype, shape=(total, d))
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
        os.replace(tmp, path)
        return np.load(path, mmap_mode="r")
    return out


def _consolidated_path(folder: Path, tag: str, keep: np.ndarray) -> Path:
    """A writable memmap in the ecif cache for folders too large to gather in RAM."""
    from ecif.data.tiny_clip import cache_dir

    stamp = [str(folder.resolve())] + [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.glob("*/*"))
    ]
    stamp.append(hashlib.sha256(np.packbits(keep).tobytes()).hexdigest())
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    path = cache_dir() / "consolidated" / digest / f"{tag}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _pick_ids(
    meta: pd.DataFrame, id_col: str | None, manifest: dict | None, folder: Path
) -> np.ndarray | None:
    if id_col is not None:
        if id_col not in meta.columns:
            raise FolderError(
                f"{folder}: id column {id_col!r} not in metadata {list(meta.columns)}"
            )
        return meta[id_col].to_numpy()
    candidates = ([manifest["id_column"]] if manifest and manifest.get("id_column") else []) + [
        c for c in ID_CANDIDATES
    ]
    for c in candidates:
        if c in meta.columns and meta[c].notna().all() and meta[c].is_unique:
            return meta[c].to_numpy()
    log.info("%s: no unique id column among %s; using row positions", folder, candidates)
    return None


def save_folder(es: EmbeddingSet, folder: str | os.PathLike, *, part_rows: int = 1_000_000) -> Path:
    """Write an EmbeddingSet in the clip-retrieval layout (float16), ``part_rows`` per part."""
    from ecif._version import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = es.metadata.copy() if es.metadata is not None else pd.DataFrame(index=range(len(es)))
    id_column = "id"
    if "id" not in meta.columns:
        meta.insert(0, "id", es.ids)
    elif not np.array_equal(meta["id"].to_numpy(), es.ids):
        id_column = "ecif_id"
        meta.insert(0, id_column, es.ids)
    if "status" not in meta.columns:
        meta["status"] = STATUS_OK
    counts = []
    for n, start in enumerate(range(0, max(len(es), 1), part_rows)):
        sl = slice(start, start + part_rows)
        write_part(folder, n, es.image[sl], es.text[sl], meta.iloc[sl], {"id_column": id_column})
        counts.append(len(meta.iloc[sl]))
    write_manifest(
        folder,
        {
            "ecif_version": __version__,
            "id_column": id_column,
            "dims": {"image": es.d_image, "text": es.d_text},
            "logit_scale": es.logit_scale,
            "rows": {"total": len(es), "ok": int((meta["status"] == STATUS_OK).sum())},
            "parts": [{"index": i, "rows": c} for i, c in enumerate(counts)],
        },
    )
    return folder
