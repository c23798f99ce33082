"""Tiny causal language models in plain torch, for the distillation companions' tests and
benchmarks (no ``transformers`` needed).

The model exposes what distillation needs: ``forward`` returns logits and the last hidden
state (after the final layer norm, like Hugging Face's ``hidden_states[-1]`` for GPT-2), and
``final_norm`` is the module whose output Flex-KD scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LMConfig:
    """Shape of a tiny GPT-style model."""

    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None  # default 4 * d_model
    max_len: int = 32


class _Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        ff = cfg.d_ff or 4 * d
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Causal self-attention over ``x``; with ``cache`` (B, H, max_len, dh key/value
        buffers) the keys and values of positions 0..T-1 are also stored for decoding."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.n_heads, d // self.n_heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            cache[0][:, :, :t] = k
            cache[1][:, :, :t] = v
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))

    def step(
        self, x: torch.Tensor, pos: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """One new token per row (x: B x 1 x d) at per-row positions ``pos``, reading and
        extending the key/value cache; keys after ``pos`` are masked out."""
        b, _, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, 1, self.n_heads, d // self.n_heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        rows = torch.arange(b)
        cache[0][rows, :, pos] = k[:, :, 0]
        cache[1][rows, :, pos] = v[:, :, 0]
        keys = torch.arange(cache[0].shape[2])
        mask = (keys[None, :] <= pos[:, None])[:, None, None, :]
        att = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, 1, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Pre-norm causal transformer; right padding is harmless because attention is causal."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(
        self, ids: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits (B, T, V), last hidden state (B, T, d_model)); fills ``cache``
        (from :meth:`new_cache`) when given, for :meth:`decode_step`."""
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if cache is None else cache[i])
        h = self.final_norm(x)
        return self.head(h), h

    def new_cache(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Empty key/value buffers for incremental decoding."""
        dh = self.cfg.d_model // self.cfg.n_heads
        shape = (batch, self.cfg.n_heads, self.cfg.max_len, dh)
        w = self.head.weight
        return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in range(self.cfg.n_layers)]

    def decode_step(
        self, tok: torch.Tensor, pos: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Logits (B, V) for one new token per row placed at positions ``pos``."""
        x = (self.tok(tok) + self.pos(pos)).unsqueeze(1)
        for blk, c in zip(self.blocks, cache):
            x = blk.step(x, pos, c)
        return self.head(self.final_norm(x))[:, 0]


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode with gradients off; returns it for chaining."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pad_batch(seqs: Sequence[Sequence[int]], pad: int = 0, length: int | None = None):
    """Right-pad token lists into (ids (B, T), lengths (B,))."""
    lens = torch.tensor([len(s) for s in seqs])
    t = length or int(lens.max())
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s)[:t], dtype=torch.long)
    return ids, lens


@torch.no_grad()
def generate(
    model: TinyLM,
    prefixes: Sequence[Sequence[int]],
    max_new: int,
    stop_tokens: Sequence[int],
    *,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    pad: int = 0,
) -> list[list[int]]:
    """Sample continuations of each prefix until a stop token (kept) or ``max_new`` tokens.

    Batched with a key/value cache: prefixes sit right-padded in one buffer, one forward pass
    fills the cache, and each row then reads the logits at its own last position and extends
    the cache one token at a time there (causal attention makes this exact).
    """
    was_training = model.training
    model.eval()
    max_len = model.cfg.max_len
    ids, lens = pad_batch(prefixes, pad, length=max_len)
    n = len(prefixes)
    out: list[list[int]] = [[] for _ in range(n)]
    stop = torch.tensor(list(stop_tokens), dtype=torch.long)
    rows = torch.arange(n)
    cache = model.new_cache(n)
    span = int(lens.max())
    logits, _ = model(ids[:, :span], cache)
    last = logits[rows, (lens - 1).clamp(min=0)]
    active = lens < max_len
    for _ in range(max_new):
        if not bool(active.any()):
            break
        if greedy:
            nxt = last.argmax(-1)
        else:
            probs = F.softmax(last / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        for i in torch.nonzero(active).flatten().tolist():
            out[i].append(int(nxt[i]))
        pos = lens.clamp(max=max_len - 1)
        lens = torch.where(active, lens + 1, lens)
        active = active & ~torch.isin(nxt, stop) & (lens < max_len)
        if not bool(active.any()):
            break
        last = model.decode_step(nxt, pos, cache)
    model.train(was_training)
    return out
