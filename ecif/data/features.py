"""The feature cache: per pair, the activations that enter a model's trainable part.

``ecif embed --cache-features projection`` (``ecif.embed(..., cache_features="projection")``)
runs the frozen trunk once and stores, per pair, the pooled features *before* the model's
output projections: the image tower's pooled output without ``visual.proj`` (after its
pooling and ``ln_post``), the text tower's pooled output without ``text_projection`` (after
``ln_final``). The embeddings of the same run are computed from those features by applying
the projections (``x @ proj``, or the text ``Linear``'s ``x W^T + b``) and normalising, so they
are what a plain ``encode_image`` / ``encode_text`` gives. Audits through the model's own
projections (``ecif score --params projection``) read the cache and need no model load.

``--cache-features lora`` (``cache_blocks=k``) stores instead the token states entering block
L-k of each tower, one flattened row per pair, and in ``trainable_init.pt`` the last k blocks
that finish the towers (``ecif.data.lora_features``).

On disk, beside the embedding folder's parts (``ecif.data.layout``)::

    EMB/features/img_feat_{N}.npy     (rows, d_f_img) float16, rows aligned with part N
    EMB/features/text_feat_{N}.npy    (rows, d_f_txt) float16
    EMB/features/trainable_init.pt    the projections and logit scale the features enter

A part's feature files are published before its metadata file, so a part with metadata has
its features; ``manifest.json`` records ``features`` (kind, widths; ``blocks`` for lora). Failed rows hold zeros.
``load_features`` reads the cache with the same rows, order and ids as ``EmbeddingSet.load``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ecif import atomic
from ecif.data import lora_features
from ecif.data.clip_split import (  # noqa: F401  (re-exported: ecif.data.features.*)
    FeatureCacheError,
    pooled_image,
    pooled_text,
    project,
    projection_tensors,
    towers,
)
from ecif.data.folder_reader import read_arrays
from ecif.data.layout import (
    FEATURES,
    TRAINABLE_INIT,
    FolderError,
    feature_paths,
    read_manifest,
)

KINDS = ("projection", "lora")
NO_CACHE_HINT = "embed with --cache-features projection"


def check_kind(kind: str | None) -> str | None:
    """``kind`` if it is None or one of ``KINDS``; a ValueError naming the choices otherwise."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"cache_features must be None or one of {list(KINDS)}, not {kind!r}")
    return kind


# --- the trunk: see ecif.data.clip_split ---------------------------------------------------
def encode(
    model: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    kind: str = "projection",
    blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One trunk pass: (image features, text features, image embeddings, text embeddings),
    the embeddings not normalised (as ``encode_image`` / ``encode_text`` give them);
    ``kind="lora"``: the features are the token-state rows of ``ecif.data.lora_features``."""
    if kind == "lora":
        return lora_features.encode(model, images, tokens, blocks)
    fu, fv = pooled_image(model, images), pooled_text(model, tokens)
    u, v = project(model, fu, fv)
    return fu, fv, u, v


def feature_dims(
    model: torch.nn.Module, kind: str = "projection", blocks: int = 1
) -> tuple[int, int]:
    """(d_f_img, d_f_txt): the widths of the cached feature rows."""
    if kind == "lora":
        return lora_features.dims(model, blocks)
    t = projection_tensors(model)
    return int(t["image_proj"].shape[0]), int(t["text_proj"].shape[0])


def check_model(lm: Any, kind: str = "projection", blocks: int = 1) -> None:
    """Refuse a model whose towers ecif cannot split (``FeatureCacheError``), and check on one
    dummy pair that features through the projections give ``encode_image`` /
    ``encode_text`` (a changed open_clip forward would fail here, not in an audit); for
    ``kind="lora"``, that the cached rows through the last ``blocks`` blocks do."""
    model = lm.model
    towers(model)
    if kind == "lora":
        lora_features.check(model, blocks)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, lm.image_size, lm.image_size, generator=gen).to(lm.device)
    tokens = lm.tokenizer(["a photo of a thing"]).to(lm.device)
    with torch.inference_mode():
        fu, fv, u, v = encode(model, image, tokens, kind, blocks)
        ref_u, ref_v = model.encode_image(image), model.encode_text(tokens)
        if kind == "lora":
            u, v = lora_features.finish(model, fu, fv, blocks)
    for name, got, ref in (("image", u, ref_u), ("text", v, ref_v)):
        if not torch.allclose(
            got.float(), ref.float(), rtol=1e-3, atol=1e-4 * float(ref.abs().max())
        ):
            raise FeatureCacheError(
                f"{lm.name}: the {name} features through its projection do not give "
                f"encode_{name}'s output (open_clip's forward changed?); cannot cache features"
            )


def trainable_init(lm: Any, kind: str = "projection", blocks: int = 1) -> dict[str, Any]:
    """What ``features/trainable_init.pt`` holds: the trainable part at the pretrained
    weights, so an audit of the cache needs no model load (for ``"lora"`` also the last
    ``blocks`` blocks, the final norms and a ``config``: ``lora_features.lora_init``)."""
    scale = getattr(lm.model, "logit_scale", None)
    log_scale = float(scale.detach().reshape(-1)[0]) if isinstance(scale, torch.Tensor) else None
    out = {
        "kind": kind,
        "tensors": projection_tensors(lm.model),
        "log_scale": log_scale,
        "model": lm.name,
        "pretrained": lm.pretrained,
    }
    if kind == "lora":
        out["tensors"], out["config"] = lora_features.lora_init(lm.model, blocks)
    return out


def write_trainable_init(
    folder: str | os.PathLike, lm: Any, kind: str = "projection", blocks: int = 1
) -> Path:
    """Write ``features/trainable_init.pt`` atomically; returns its path."""
    path = Path(folder) / FEATURES / TRAINABLE_INIT
    with atomic.atomic_path(path) as tmp:
        torch.save(trainable_init(lm, kind, blocks), tmp)
    return path


def manifest_entry(lm: Any, kind: str = "projection", blocks: int = 1) -> dict[str, Any]:
    """The manifest's ``features`` entry (``"lora"``: also ``blocks``, the k of L-k)."""
    d_img, d_txt = feature_dims(lm.model, kind, blocks)
    return {
        "kind": kind,
        "dims": {"image": d_img, "text": d_txt},
        "dtype": "float16",
        "init": f"{FEATURES}/{TRAINABLE_INIT}",
        **({"blocks": int(blocks)} if kind == "lora" else {}),
    }


# --- the reader ---------------------------------------------------------------------------
@dataclass
class FeatureSet:
    """The cached features of an embedding folder, row for row as ``EmbeddingSet.load``.

    ``image`` (N, d_f_img) and ``text`` (N, d_f_txt): float16 as stored (memory-mapped for
    one part with nothing dropped), or the ``dtype`` asked for. ``ids``: the same ids as the
    embedding reader's. ``part``: the input shard (part index) of each row. ``init``: the
    ``trainable_init.pt`` dict (``kind``, ``tensors``, ``log_scale``, ``model``,
    ``pretrained``). ``kind``: ``"projection"``. ``metadata``: the rows' metadata.
    """

    image: np.ndarray
    text: np.ndarray
    ids: np.ndarray
    part: np.ndarray
    init: dict[str, Any]
    kind: str
    metadata: pd.DataFrame | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __repr__(self) -> str:
        return (
            f"FeatureSet(kind={self.kind!r}, n={len(self)}, d_image={self.image.shape[1]}, "
            f"d_text={self.text.shape[1]})"
        )


class StackedRows:
    """Chosen rows of several (memory-mapped) arrays, stacked, read only when asked for.
    Why: a model mode's twin audit (``ecif.audit.probes``) reads its training pairs, planted
    copies and held validation pairs this way instead of copying them: lora token states
    are about 150 KB a pair for CLIP ViT-B/32, 4 GB for a twin of 27,000 rows."""

    def __init__(self, parts: list[tuple[Any, np.ndarray]]) -> None:
        self.bases = [base for base, _ in parts]
        self.source = np.concatenate([np.full(len(r), k) for k, (_, r) in enumerate(parts)])
        self.row = np.concatenate([np.asarray(r, dtype=np.int64) for _, r in parts])
        self.dtype = np.dtype(self.bases[0].dtype)
        self.shape = (len(self.row), *self.bases[0].shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, key: Any) -> np.ndarray:
        source, row = self.source[key], self.row[key]
        if np.ndim(source) == 0:
            return np.asarray(self.bases[int(source)][int(row)])
        out = np.empty((len(row), *self.shape[1:]), self.dtype)
        for k, base in enumerate(self.bases):
            hit = source == k
            if hit.any():
                out[hit] = base[row[hit]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def load_features(
    folder: str | os.PathLike,
    *,
    keep_failed: bool = False,
    id_col: str | None = None,
    dtype: Any = None,
    in_memory_limit: int = 1 << 30,
) -> FeatureSet:
    """Read the feature cache of an embedding folder written with ``--cache-features``.

    Rows, order and ids are ``EmbeddingSet.load``'s for the same folder and arguments
    (``ecif.data.folder_reader``: usable rows only unless ``keep_failed``). ``dtype`` (e.g.
    ``np.float32``) gathers into RAM in that dtype. A folder without a cache is a
    ``FolderError``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderError(f"{folder}: no such folder")
    entry = (read_manifest(folder) or {}).get("features")
    if not entry:
        raise FolderError(f"{folder}: has no feature cache ({NO_CACHE_HINT})")
    init_path = folder / FEATURES / TRAINABLE_INIT
    if not init_path.exists():
        raise FolderError(f"{init_path}: missing (the feature cache has no trainable_init.pt)")
    try:
        init = torch.load(init_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FolderError(f"{init_path}: cannot be read ({type(e).__name__}: {e})") from e
    rows = read_arrays(
        folder,
        lambda n: feature_paths(folder, n),
        what="features",
        tags=("img_feat", "text_feat"),
        keep_failed=keep_failed,
        id_col=id_col,
        in_memory_limit=in_memory_limit,
        dtype=dtype,
    )
    kind = entry.get("kind") or init.get("kind")
    if init.get("kind") != kind:
        raise FolderError(f"{init_path}: kind {init.get('kind')!r}, manifest says {kind!r}")
    ids = rows.ids if rows.ids is not None else np.arange(len(rows.metadata))
    return FeatureSet(rows.image, rows.text, ids, rows.part, init, kind, rows.metadata)
