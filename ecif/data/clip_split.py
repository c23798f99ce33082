"""Splitting an open_clip model at its output projections: the towers, their pooled features
before the projections, and the projections as tensors (``ecif.data.features`` and
``ecif.data.lora_features`` build their caches on these)."""

from __future__ import annotations

from typing import Any

import torch


class FeatureCacheError(ValueError):
    """A model whose trainable part ``ecif embed --cache-features`` cannot separate."""


def towers(model: torch.nn.Module) -> tuple[Any, Any, str]:
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
    visual, _, _ = towers(model)
    x = visual._embeds(images)
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    return pooled


def pooled_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The text tower's pooled output before ``text_projection`` (``encode_text``, less the
    projection)."""
    from open_clip.transformer import text_global_pool

    _, t, kind = towers(model)
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
    visual, t, _ = towers(model)
    proj = t.text_projection
    u = image_features @ visual.proj
    v = proj(text_features) if isinstance(proj, torch.nn.Linear) else text_features @ proj
    return u, v


def projection_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projections as right-multiplied matrices (float32 CPU copies): ``image_proj``
    (d_f_img, d), ``text_proj`` (d_f_txt, d), and ``image_bias`` / ``text_bias`` (d,) when
    the projection has one (a ``Linear`` text projection: its ``weight.T`` and ``bias``)."""
    visual, t, _ = towers(model)

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
