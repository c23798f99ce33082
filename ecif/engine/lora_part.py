"""The "lora" trainable part: low-rank adapters in the last blocks of both towers, plus both
output projections and the log temperature (docs/math.md section 12).

The feature cache (``ecif embed --cache-features lora``, ``ecif.data.lora_features``) holds,
per pair, the token states entering block L-k of each tower; its ``trainable_init`` holds the
last k blocks, the final norms and the projections. ``LoraPart`` runs those blocks as plain
tensor code (functional, so ``torch.func`` takes JVPs, VJPs and Hessian-vector products
through it), each adapted weight ``W`` acting as ``W + (alpha/r) B A``:

    h W^T + b  ->  h W^T + b + (alpha/r) (h A^T) B^T,   A (r, d_in), B (d_out, r)

on the attention's input and output maps (``attn_in``: q, k and v together; ``attn_out``) and
the MLP's two maps (``mlp_fc``, ``mlp_proj``) of the adapted blocks. B starts at 0 and A at a
seeded Gaussian, so theta_0 is the pretrained model exactly, and the pull ``lam/2 |theta -
theta_0|^2`` keeps the fit near it (A is pulled to its random start, as usual for LoRA with
weight decay). Padded batch slots (all-zero rows) give zero embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ecif.engine.encoder_part import ParamLayout, normalize, second_moment

TARGETS = ("attn_in", "attn_out", "mlp_fc", "mlp_proj")
SIDES = ("image", "text")
# rows of token states a pass holds at a time (a block's activations are tokens x 4 width)
LORA_CHUNK_ROWS = 256


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


class LoraPart:
    """x, y = the towers' last blocks with rank-``rank`` adapters, pooled, projected and
    normalised; t = exp(theta_t).

    ``tensors`` and ``config``: a lora feature cache's ``init["tensors"]`` / ``["config"]``
    (the projections as in ``ProjectionPart``; ``{side}.blocks.{j}.*`` for the cached blocks
    j = 0..k-1; ``{side}.norm.*``). ``blocks``: how many of the last cached blocks carry
    adapters (default all k; earlier cached blocks run frozen). ``alpha``: the adapters' scale
    is alpha / rank (default alpha = rank). ``floors`` as in ``ProjectionPart``.
    """

    kind = "lora"
    chunk_rows = LORA_CHUNK_ROWS
    kfac_rows = 512  # rows whose inner states estimate the K-FAC moments (tokens x rows)

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        config: dict,
        log_scale: float,
        *,
        rank: int = 4,
        blocks: int | None = None,
        alpha: float | None = None,
        learn_scale: bool = True,
        floors: tuple[float, float] = (0.0, 0.0),
        seed: int = 0,
    ):
        cached = int(config["blocks"])
        blocks = cached if blocks is None else int(blocks)
        if not 1 <= blocks <= cached:
            raise ValueError(f"lora blocks must be 1..{cached} (the cache's k); got {blocks}")
        if rank < 1:
            raise ValueError(f"lora rank must be >= 1; got {rank}")
        if tensors["image_proj"].shape[1] != tensors["text_proj"].shape[1]:
            raise ValueError("the projections map to different widths")
        self.tensors = dict(tensors)
        self.config = config
        self.log_scale = float(log_scale)
        self.rank, self.blocks, self.seed = int(rank), blocks, int(seed)
        self.alpha = float(rank if alpha is None else alpha)
        self.learn_scale = bool(learn_scale)
        self.floors = (float(floors[0]), float(floors[1]))
        self.adapted = tuple(range(cached - blocks, cached))
        proj = [n for n in ("image_proj", "text_proj", "image_bias", "text_bias") if n in tensors]
        names = list(proj)
        shapes = [tuple(tensors[n].shape) for n in proj]
        gen = torch.Generator().manual_seed(self.seed)
        self.a0: dict[str, torch.Tensor] = {}
        for side in SIDES:
            for j in self.adapted:
                for t in TARGETS:
                    d_out, d_in = tensors[f"{side}.blocks.{j}.{t}.weight"].shape
                    key = f"{side}.{j}.{t}"
                    self.a0[key] = torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
                    self.a0[key] /= math.sqrt(d_in)
                    names += [f"{key}.A", f"{key}.B"]
                    shapes += [(rank, d_in), (d_out, rank)]
        if self.learn_scale:
            names.append("log_scale")
            shapes.append(())
        self.layout = ParamLayout(tuple(names), tuple(shapes))
        self._frozen: dict[tuple, dict[str, torch.Tensor]] = {}
        self._record: dict[str, torch.Tensor] | None = None  # kfac_inputs: the maps' inputs

    def initial(self) -> torch.Tensor:
        """theta_0: the pretrained projections, A at its seeded start, B = 0."""
        flat = []
        for name, shape in zip(self.layout.names, self.layout.shapes):
            if name.endswith(".A"):
                flat.append(self.a0[name[:-2]].reshape(-1))
            elif name.endswith(".B"):
                flat.append(torch.zeros(math.prod(shape), dtype=torch.float64))
            elif name == "log_scale":
                flat.append(torch.tensor([self.log_scale], dtype=torch.float64))
            else:
                flat.append(self.tensors[name].reshape(-1).double())
        return torch.cat(flat)

    def frozen(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen tensors in ``like``'s dtype and device (converted once)."""
        key = (like.dtype, like.device)
        if key not in self._frozen:
            self._frozen[key] = {
                n: t.to(dtype=like.dtype, device=like.device) for n, t in self.tensors.items()
            }
        return self._frozen[key]

    # --- the forward -------------------------------------------------------------------
    def _linear(self, h, fr, p, side, j, target):
        prefix = f"{side}.blocks.{j}.{target}"
        out = F.linear(h, fr[f"{prefix}.weight"], fr.get(f"{prefix}.bias"))
        key = f"{side}.{j}.{target}"
        if f"{key}.A" in p:
            scale = self.alpha / self.rank
            z = F.linear(h, p[f"{key}.A"])
            out = out + scale * F.linear(z, p[f"{key}.B"])
            if self._record is not None:
                self._record[f"{key}.A"], self._record[f"{key}.B"] = h, z
        return out

    def _block(self, x, fr, p, side, j, causal):
        cfg = self.config[side]
        eps, width, heads = cfg["eps"], cfg["width"], cfg["heads"]
        pre = f"{side}.blocks.{j}."
        n, t, _ = x.shape
        h = F.layer_norm(x, (width,), fr[pre + "ln_1.weight"], fr[pre + "ln_1.bias"], eps)
        qkv = self._linear(h, fr, p, side, j, "attn_in")
        q, k, v = (z.reshape(n, t, heads, -1).transpose(1, 2) for z in qkv.split(width, -1))
        att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            above = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(above, float("-inf"))
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, t, width)
        o = self._linear(o, fr, p, side, j, "attn_out")
        x = x + (o * fr[pre + "ls_1.gamma"] if pre + "ls_1.gamma" in fr else o)
        h = F.layer_norm(x, (width,), fr[pre + "ln_2.weight"], fr[pre + "ln_2.bias"], eps)
        h = self._linear(_act(cfg["activation"], self._linear(h, fr, p, side, j, "mlp_fc")),
                         fr, p, side, j, "mlp_proj")  # fmt: skip
        return x + (h * fr[pre + "ls_2.gamma"] if pre + "ls_2.gamma" in fr else h)

    def _norm(self, x, fr, side):
        cfg = self.config[side]
        w, b = fr[f"{side}.norm.weight"], fr[f"{side}.norm.bias"]
        return F.layer_norm(x, (cfg["width"],), w, b, cfg["eps"])

    def _image(self, rows, fr, p):
        cfg = self.config["image"]
        x = rows.reshape(len(rows), cfg["tokens"], cfg["width"])
        for j in range(self.config["blocks"]):
            x = self._block(x, fr, p, "image", j, causal=False)
        if not cfg["norm_after_pool"]:
            x = self._norm(x, fr, "image")
        pooled = x[:, 0] if cfg["pool"] == "tok" else x[:, 1:].mean(1)
        return self._norm(pooled, fr, "image") if cfg["norm_after_pool"] else pooled

    def _text(self, rows, fr, p):
        cfg = self.config["text"]
        pos = rows[:, 0].detach().round().long()
        x = rows[:, 1:].reshape(len(rows), cfg["tokens"], cfg["width"])
        if cfg["causal"] and len(rows):  # later positions never reach the pooled one
            x = x[:, : int(pos.max()) + 1]
        for j in range(self.config["blocks"]):
            x = self._block(x, fr, p, "text", j, causal=cfg["causal"])
        x = self._norm(x, fr, "text")
        return x[torch.arange(len(x), device=x.device), pos]

    def project(self, theta, image, text):
        """(u, v): the projected embeddings before normalisation, rows ``(..., F)``."""
        p = self.layout.unflatten(theta)
        fr = self.frozen(theta)
        lead = image.shape[:-1]
        fi, ft = image.reshape(-1, image.shape[-1]), text.reshape(-1, text.shape[-1])
        pooled_i, pooled_t = self._image(fi, fr, p), self._text(ft, fr, p)
        if self._record is not None:
            self._record["image_proj"], self._record["text_proj"] = pooled_i, pooled_t
        u, v = pooled_i @ p["image_proj"], pooled_t @ p["text_proj"]
        if "image_bias" in p:
            u = u + p["image_bias"]
        if "text_bias" in p:
            v = v + p["text_bias"]
        u = u * (fi != 0).any(-1, keepdim=True)  # padded slots: zero embeddings
        v = v * (ft[:, 1:] != 0).any(-1, keepdim=True)
        return u.reshape(*lead, -1), v.reshape(*lead, -1)

    def kfac_inputs(self, theta, image, text) -> dict[str, tuple[torch.Tensor, int]]:
        """Input second moments of every adapted map and of both projections, from one
        forward pass over ``image``/``text`` rows (tokens count as rows): A reads what its weight
        reads, B that input's image under A (input axis 1, as a torch weight), a projection
        the pooled features (axis 0)."""
        self._record = {}
        try:
            self.project(theta, image, text)
            seen = self._record
        finally:
            self._record = None
        return {
            name: (second_moment(x), 0 if name.endswith("proj") else 1) for name, x in seen.items()
        }

    def embed(self, theta, image, text):
        """(x, y, log_t) for a stack of batches of cached rows ``(c, B, F)`` (or ``(N, F)``)."""
        u, v = self.project(theta, image, text)
        if self.learn_scale:
            log_t = self.layout.unflatten(theta)["log_scale"]
        else:
            log_t = theta.new_tensor(self.log_scale)
        return normalize(u, self.floors[0]), normalize(v, self.floors[1]), log_t

    def state(self) -> dict:
        return {
            "kind": self.kind,
            "tensors": {k: v.detach().cpu() for k, v in self.tensors.items()},
            "config": self.config,
            "log_scale": self.log_scale,
            "learn_scale": self.learn_scale,
            "floors": self.floors,
            "rank": self.rank,
            "blocks": self.blocks,
            "alpha": self.alpha,
            "seed": self.seed,
        }

    @classmethod
    def from_state(cls, state: dict) -> LoraPart:
        return cls(
            state["tensors"],
            state["config"],
            state["log_scale"],
            rank=state["rank"],
            blocks=state["blocks"],
            alpha=state["alpha"],
            learn_scale=state["learn_scale"],
            floors=tuple(state["floors"]),
            seed=state["seed"],
        )
