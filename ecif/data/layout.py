"""The clip-retrieval embedding folder on disk: its paths, manifest and parts, written atomically.

Layout: ``img_emb/img_emb_{N}.npy`` and ``text_emb/text_emb_{N}.npy`` (float16, unit norm) and
``metadata/metadata_{N}.parquet``, rows aligned by position, plus ecif's ``manifest.json``.
Folders that clip-retrieval wrote itself (no manifest, no ``status`` column) load as well.
``ecif embed --cache-features projection`` adds ``features/img_feat_{N}.npy`` and
``features/text_feat_{N}.npy`` (float16, the pooled features before the model's output
projections) and ``features/trainable_init.pt`` (``ecif.data.features``).

Rows that could not be embedded keep their metadata row with ``status`` != ``"ok"`` and an
``error_message``; their embedding rows are all zeros. Reading a folder (which rows count,
which column holds the ids) is ``ecif.data.folder_reader``; ``EmbeddingSet.load`` and
``EmbeddingSet.save`` (``ecif.data.embedding_set``) are the front of both.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecif import atomic

MANIFEST = "manifest.json"
STATUS_OK = "ok"
FEATURES = "features"  # the feature cache's folder (ecif.data.features)
TRAINABLE_INIT = "trainable_init.pt"
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


def feature_paths(folder: Path, n: int) -> tuple[Path, Path]:
    """(img, text) paths of part ``n``'s cached features (``--cache-features``)."""
    return (
        folder / FEATURES / f"img_feat_{n}.npy",
        folder / FEATURES / f"text_feat_{n}.npy",
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
    atomic.write_json(Path(folder) / MANIFEST, manifest)


def clean_stale_temps(folder: Path) -> int:
    """Remove temp files a killed run left behind; returns how many."""
    return sum(
        atomic.clean_temps(folder / sub)
        for sub in ("img_emb", "text_emb", "metadata", FEATURES, ".")
    )


def write_part(
    folder: str | os.PathLike,
    n: int,
    image: np.ndarray,
    text: np.ndarray,
    metadata: pd.DataFrame,
    kv_metadata: dict[str, Any] | None = None,
) -> None:
    """Write part ``n`` whole: the two arrays first, the metadata file last (it marks done)."""
    folder = Path(folder)
    if not (len(image) == len(text) == len(metadata)):
        raise ValueError(f"part {n}: {len(image)} image, {len(text)} text, {len(metadata)} rows")
    img_p, txt_p, meta_p = part_paths(folder, n)
    for p, arr in ((img_p, image), (txt_p, text)):
        with atomic.atomic_path(p) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(arr, dtype=np.float16))
    publish_metadata(meta_p, metadata, kv_metadata)


def publish_metadata(
    path: Path, metadata: pd.DataFrame, kv_metadata: dict[str, Any] | None = None
) -> None:
    """Write a part's metadata parquet atomically, with ecif's key-value metadata (JSON)."""
    atomic.write_parquet_atomic(path, metadata, kv_metadata)


def part_kv(path: Path) -> dict[str, Any]:
    """ecif key-value metadata of a finished part (empty for foreign folders)."""
    return atomic.read_parquet_meta(path)


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
