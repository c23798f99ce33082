"""The feature cache of ``params="lora"``: the token states entering block L-k of each tower.

``ecif embed --cache-features lora --cache-blocks k`` runs each tower's first L-k blocks
once and stores, per pair, the token states that enter block L-k, flattened to one float16
row (so the cache keeps the projection cache's 2-D part layout and reader):

- image row: the (T_img, W_img) states, row-major;
- text row: the position the text tower pools (the EOT token for CLIP's ``argmax`` pooling),
  then the (T_txt, W_txt) states. Positions are small integers, exact in float16.

What finishes the towers (the last k blocks, the final norms, the pooling and both
projections, as tensors, and a config: widths, heads, activation, pooling, causal mask) is in
``features/trainable_init.pt`` (``lora_init``), so an audit needs no model load; the
embeddings of the same run come from the same trunk pass through the model's own modules, so
they are what ``encode_image`` / ``encode_text`` give. ``ecif.engine.lora_part`` reads both.
"""

from __future__ import annotations

from typing import Any

import torch

from ecif.data.clip_split import FeatureCacheError, project, projection_tensors, towers

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def _blocks(transformer: Any, k: int, what: str) -> list:
    from open_clip.transformer import ResidualAttentionBlock

    blocks = list(transformer.resblocks)
    if not 1 <= k <= len(blocks):
        raise FeatureCacheError(
            f"--cache-blocks {k}: the {what} tower has {len(blocks)} blocks (1..{len(blocks)})"
        )
    for b in blocks[-k:]:
        if type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv"):
            raise FeatureCacheError(
                f"--cache-features lora needs open_clip's plain ResidualAttentionBlock in the "
                f"{what} tower; this model has {type(b).__name__}"
            )
    return blocks


def _activation(block: Any) -> str:
    from open_clip.transformer import QuickGELU

    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    raise FeatureCacheError(f"--cache-features lora: unsupported activation {type(act).__name__}")


def _run(transformer: Any, x: torch.Tensor, blocks: list, attn_mask=None) -> torch.Tensor:
    """``blocks`` of an open_clip Transformer on batch-first ``x``."""
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for b in blocks:
        x = b(x, attn_mask=attn_mask)
    return x.transpose(0, 1) if not transformer.batch_first else x


def _text(model: torch.nn.Module) -> tuple[Any, str, str, int | None]:
    """(text owner, kind, pool type, eos id), refusing what the lora cache cannot split."""
    _, t, kind = towers(model)
    if kind == "clip":
        pool, eos = t.text_pool_type, getattr(t, "text_eos_id", None)
    else:
        if t.cls_emb is not None or t.use_pad_mask:
            raise FeatureCacheError(
                "--cache-features lora: text towers with a class token or a padding mask are "
                "not supported"
            )
        pool, eos = t.pool_type, getattr(t, "eos_id", None)
    if pool not in ("argmax", "eos", "first", "last"):
        raise FeatureCacheError(f"--cache-features lora: text pooling {pool!r} not supported")
    mask = t.attn_mask
    if mask is not None:
        n = mask.shape[-1]
        causal = torch.full((n, n), float("-inf")).triu(1)
        if mask.shape != (n, n) or not torch.equal(mask.float().cpu(), causal):
            raise FeatureCacheError("--cache-features lora: the text mask is not causal")
    return t, kind, pool, eos


def check(model: torch.nn.Module, k: int) -> None:
    """Refuse (``FeatureCacheError``) a model whose towers the lora cache cannot split at k."""
    visual, _, _ = towers(model)
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise FeatureCacheError(
            "--cache-features lora needs token ('tok') or average pooling without attentional "
            "pooling in the image tower"
        )
    _blocks(visual.transformer, k, "image")
    t, *_ = _text(model)
    _blocks(t.transformer, k, "text")


def pool_positions(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The position the text tower pools, per caption (long)."""
    _, _, pool, eos = _text(model)
    n = tokens.shape[-1]
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        return (tokens == eos).int().argmax(dim=-1)
    return torch.full(tokens.shape[:1], 0 if pool == "first" else n - 1, device=tokens.device)


def encode(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One trunk pass: (image rows, text rows, image embeddings, text embeddings); the rows
    are the cached layout (see the module doc), the embeddings the model's own (not
    normalised), continued from the same states."""
    visual, t, kind = towers(model)
    vb = _blocks(visual.transformer, k, "image")
    x = _run(visual.transformer, visual._embeds(images), vb[:-k])
    img_states = x
    pooled, _ = visual._pool(_run(visual.transformer, x, vb[-k:]))
    t, kind, _, _ = _text(model)
    tb = _blocks(t.transformer, k, "text")
    if kind == "clip":
        cast = t.transformer.get_cast_dtype()
        y = t.token_embedding(tokens).to(cast) + t.positional_embedding.to(cast)
    else:
        y, _ = t._embeds(tokens)
    mask = t.attn_mask
    y = _run(t.transformer, y, tb[:-k], mask)
    txt_states = y
    pos = pool_positions(model, tokens)
    y = t.ln_final(_run(t.transformer, y, tb[-k:], mask))
    pooled_txt = y[torch.arange(len(y), device=y.device), pos]
    u, v = project(model, pooled, pooled_txt)
    rows_img = img_states.reshape(len(img_states), -1)
    rows_txt = torch.cat(
        [pos[:, None].to(txt_states.dtype), txt_states.reshape(len(txt_states), -1)], dim=1
    )
    return rows_img, rows_txt, u, v


def finish(
    model: torch.nn.Module, image_rows: torch.Tensor, text_rows: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings (not normalised) from cached rows, through the model's own last k blocks,
    norms, pooling and projections (what the cache promises; used by tests and
    ``check_model``)."""
    visual, t, _ = towers(model)
    d = visual.transformer.width
    x = image_rows.reshape(len(image_rows), -1, d).to(visual.proj.dtype)
    pooled, _ = visual._pool(_run(visual.transformer, x, list(visual.transformer.resblocks)[-k:]))
    t, *_ = _text(model)
    pos = text_rows[:, 0].round().long()
    y = text_rows[:, 1:].reshape(len(text_rows), -1, t.transformer.width).to(visual.proj.dtype)
    y = t.ln_final(_run(t.transformer, y, list(t.transformer.resblocks)[-k:], t.attn_mask))
    return project(model, pooled, y[torch.arange(len(y), device=y.device), pos])


def dims(model: torch.nn.Module, k: int) -> tuple[int, int]:
    """(image row width, text row width) of the cache."""
    visual, _, _ = towers(model)
    t, *_ = _text(model)
    n_img = visual.positional_embedding.shape[0] * visual.transformer.width
    n_txt = t.positional_embedding.shape[0] * t.transformer.width
    return int(n_img), int(1 + n_txt)


def _cpu(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float32).clone()


def _block_tensors(prefix: str, b: Any) -> dict[str, torch.Tensor]:
    out = {
        "ln_1.weight": b.ln_1.weight,
        "ln_1.bias": b.ln_1.bias,
        "attn_in.weight": b.attn.in_proj_weight,
        "attn_in.bias": b.attn.in_proj_bias,
        "attn_out.weight": b.attn.out_proj.weight,
        "attn_out.bias": b.attn.out_proj.bias,
        "ln_2.weight": b.ln_2.weight,
        "ln_2.bias": b.ln_2.bias,
        "mlp_fc.weight": b.mlp.c_fc.weight,
        "mlp_fc.bias": b.mlp.c_fc.bias,
        "mlp_proj.weight": b.mlp.c_proj.weight,
        "mlp_proj.bias": b.mlp.c_proj.bias,
    }
    for ls in ("ls_1", "ls_2"):
        if hasattr(getattr(b, ls), "gamma"):
            out[f"{ls}.gamma"] = getattr(b, ls).gamma
    return {f"{prefix}{n}": _cpu(v) for n, v in out.items() if v is not None}


def _tower_config(transformer: Any, blocks: list, tokens: int, norm: Any) -> dict[str, Any]:
    b = blocks[-1]
    return {
        "tokens": int(tokens),
        "width": int(transformer.width),
        "heads": int(b.attn.num_heads),
        "activation": _activation(b),
        "eps": float(norm.eps),
        "layerscale": hasattr(b.ls_1, "gamma"),
    }


def lora_init(model: torch.nn.Module, k: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) of the part after the cache: the projections (``projection_tensors``),
    the last k blocks of each tower (``image.blocks.{j}.*``, ``text.blocks.{j}.*``, j = 0..k-1
    from block L-k), the final norms, and how to run them."""
    check(model, k)
    visual, _, _ = towers(model)
    t, _, pool, _ = _text(model)
    tensors = projection_tensors(model)
    config: dict[str, Any] = {"blocks": int(k)}
    for side, tr, norm, n_tok in (
        ("image", visual.transformer, visual.ln_post, visual.positional_embedding.shape[0]),
        ("text", t.transformer, t.ln_final, t.positional_embedding.shape[0]),
    ):
        blocks = list(tr.resblocks)[-k:]
        for j, b in enumerate(blocks):
            tensors.update(_block_tensors(f"{side}.blocks.{j}.", b))
        tensors[f"{side}.norm.weight"] = _cpu(norm.weight)
        tensors[f"{side}.norm.bias"] = _cpu(norm.bias)
        config[side] = _tower_config(tr, blocks, n_tok, norm)
    config["image"].update(pool=visual.pool_type, norm_after_pool=bool(visual.final_ln_after_pool))
    config["text"].update(pool=pool, causal=t.attn_mask is not None)
    return tensors, config
