"""The feature cache: per pair, the activations that enter a model's trainable part.

``ecif embed --cache-features projection`` (``ecif.embed(..., cache_features="projection")``)
runs the frozen trunk once and stores, per pair, the pooled features *before* the model's
output projections: the image tower's pooled output without ``visual.proj`` (after its
pooling and ``ln_post``), the text tower's pooled output without ``text_projection`` (after
``ln_final``). The embeddings of the same run are computed from those features by applying
the projections (``x @ proj``, or the text ``Linear``'s ``x W^T + b``) and normalising, so they
are what a plain ``encode_image`` / ``encode_text`` gives. Audits through the model's own
projections (``ecif score --params projection``) read the cache and need no model load.

On disk, beside the embedding folder's parts (``ecif.data.layout``)::

    EMB/features/img_feat_{N}.npy     (rows, d_f_img) float16, rows aligned with part N
    EMB/features/text_feat_{N}.npy    (rows, d_f_txt) float16
    EMB/features/trainable_init.pt    the projections and logit scale the features enter

A part's feature files are published before its metadata file, so a part with metadata has
its features; ``manifest.json`` records ``features`` (kind, widths). Failed rows hold zeros.
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
from ecif.data.folder_reader import read_arrays
from ecif.data.layout import (
    FEATURES,
    TRAINABLE_INIT,
    FolderError,
    feature_paths,
    read_manifest,
)

KINDS = ("projection",)
NO_CACHE_HINT = "embed with --cache-features projection"


class FeatureCacheError(ValueError):
    """A model whose trainable part ``ecif embed --cache-features`` cannot separate."""


def check_kind(kind: str | None) -> str | None:
    """``kind`` if it is None or one of ``KINDS``; a ValueError naming the choices otherwise."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"cache_features must be None or one of {list(KINDS)}, not {kind!r}")
    return kind


# --- the trunk: pooled features before the projections -----------------------------------
def _towers(model: torch.nn.Module) -> tuple[Any, Any, str]:
    """(image tower, text owner, text kind): ``"clip"`` (open_clip's CLIP, the text layers on
    the model itself) or ``"tower"`` (CustomTextCLIP's ``model.text``, a TextTransformer)."""
    from open_clip.transformer import TextTransformer, VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer) or getattr(visual, "proj", None) is None:
        raise FeatureCacheError(
            f"--cache-features projection needs an open_clip ViT image tower with an output "
            f"projection (visual.proj); this model's is {type(visual).__name__}"
        )
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        owner, kind = text, "tower"
    elif hasattr(model, "token_embedding") and hasattr(model, "ln_final"):
        owner, kind = model, "clip"
    else:
        raise FeatureCacheError(
            "--cache-features projection needs open_clip's own text transformer; this model's "
            f"text tower is {type(text).__name__}"
        )
    if getattr(owner, "text_projection", None) is None:
        raise FeatureCacheError(
            "--cache-features projection needs a text output projection (text_projection); "
            "this model has none"
        )
    return visual, owner, kind


def pooled_image(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The image tower's pooled output before ``visual.proj`` (open_clip's forward, less the
    projection)."""
    visual, _, _ = _towers(model)
    x = visual._embeds(images)
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    return pooled


def pooled_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The text tower's pooled output before ``text_projection`` (``encode_text``, less the
    projection)."""
    from open_clip.transformer import text_global_pool

    _, t, kind = _towers(model)
    if kind == "clip":
        cast = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast)
        x = x + t.positional_embedding.to(cast)
        x = t.transformer(x, attn_mask=t.attn_mask)
        x = t.ln_final(x)
        eos = getattr(t, "text_eos_id", None)
        return text_global_pool(x, tokens, t.text_pool_type, eos_token_id=eos)
    x, attn_mask = t._embeds(tokens)
    x = t.transformer(x, attn_mask=attn_mask)
    if t.cls_emb is not None:  # CoCa style: the appended class token, normed after pooling
        return t.ln_final(text_global_pool(x, pool_type="last"))
    x = t.ln_final(x)
    eos = getattr(t, "eos_id", None)
    return text_global_pool(x, tokens, pool_type=t.pool_type, eos_token_id=eos)


def project(
    model: torch.nn.Module, image_features: torch.Tensor, text_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings (not normalised) from pooled features, through the model's own
    projections, as open_clip applies them."""
    visual, t, _ = _towers(model)
    proj = t.text_projection
    u = image_features @ visual.proj
    v = proj(text_features) if isinstance(proj, torch.nn.Linear) else text_features @ proj
    return u, v


def encode(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One trunk pass: (image features, text features, image embeddings, text embeddings),
    the embeddings not normalised (as ``encode_image`` / ``encode_text`` give them)."""
    fu, fv = pooled_image(model, images), pooled_text(model, tokens)
    u, v = project(model, fu, fv)
    return fu, fv, u, v


def projection_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projections as right-multiplied matrices (float32 CPU copies): ``image_proj``
    (d_f_img, d), ``text_proj`` (d_f_txt, d), and ``image_bias`` / ``text_bias`` (d,) when
    the projection has one (a ``Linear`` text projection: its ``weight.T`` and ``bias``)."""
    visual, t, _ = _towers(model)

    def cpu(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu", torch.float32).clone()

    out = {"image_proj": cpu(visual.proj)}
    proj = t.text_projection
    if isinstance(proj, torch.nn.Linear):
        out["text_proj"] = cpu(proj.weight.T)
        if proj.bias is not None:
            out["text_bias"] = cpu(proj.bias)
    else:
        out["text_proj"] = cpu(proj)
    return out


def feature_dims(model: torch.nn.Module) -> tuple[int, int]:
    """(d_f_img, d_f_txt): the widths of the cached features."""
    t = projection_tensors(model)
    return int(t["image_proj"].shape[0]), int(t["text_proj"].shape[0])


def check_model(lm: Any) -> None:
    """Refuse a model whose towers ecif cannot split (``FeatureCacheError``), and check on one
    dummy pair that features through the projections give ``encode_image`` /
    ``encode_text`` (a changed open_clip forward would fail here, not in an audit)."""
    model = lm.model
    _towers(model)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, lm.image_size, lm.image_size, generator=gen).to(lm.device)
    tokens = lm.tokenizer(["a photo of a thing"]).to(lm.device)
    with torch.inference_mode():
        _, _, u, v = encode(model, image, tokens)
        ref_u, ref_v = model.encode_image(image), model.encode_text(tokens)
    for name, got, ref in (("image", u, ref_u), ("text", v, ref_v)):
        if not torch.allclose(
            got.float(), ref.float(), rtol=1e-3, atol=1e-4 * float(ref.abs().max())
        ):
            raise FeatureCacheError(
                f"{lm.name}: the {name} features through its projection do not give "
                f"encode_{name}'s output (open_clip's forward changed?); cannot cache features"
            )


def trainable_init(lm: Any, kind: str = "projection") -> dict[str, Any]:
    """What ``features/trainable_init.pt`` holds: the trainable part at the pretrained
    weights, so an audit of the cache needs no model load."""
    scale = getattr(lm.model, "logit_scale", None)
    log_scale = float(scale.detach().reshape(-1)[0]) if isinstance(scale, torch.Tensor) else None
    return {
        "kind": kind,
        "tensors": projection_tensors(lm.model),
        "log_scale": log_scale,
        "model": lm.name,
        "pretrained": lm.pretrained,
    }


def write_trainable_init(folder: str | os.PathLike, lm: Any, kind: str = "projection") -> Path:
    """Write ``features/trainable_init.pt`` atomically; returns its path."""
    path = Path(folder) / FEATURES / TRAINABLE_INIT
    with atomic.atomic_path(path) as tmp:
        torch.save(trainable_init(lm, kind), tmp)
    return path


def manifest_entry(lm: Any, kind: str = "projection") -> dict[str, Any]:
    """The manifest's ``features`` entry."""
    d_img, d_txt = feature_dims(lm.model)
    return {
        "kind": kind,
        "dims": {"image": d_img, "text": d_txt},
        "dtype": "float16",
        "init": f"{FEATURES}/{TRAINABLE_INIT}",
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
