"""The trainable part of a CLIP model in the model modes: what maps cached features to embeddings.

In the head mode the parameters are a bilinear adapter over frozen embeddings. In a model
mode they sit inside the encoders: the frozen trunk runs once and its output (the features
entering the trainable part) is cached; a part maps a batch of those features, given a flat
parameter vector ``theta``, to unit-norm image and text embeddings and the log temperature.
Everything downstream (loss, removal term, scores) is the same function of the batch's
logits as in the head mode (docs/math.md section 12).

``ProjectionPart``: both towers' output projections (and biases when the model has them)
plus the log temperature, the "projection" mode. ``ecif.engine.lora_part`` adds low-rank
adapters inside the last blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

# norm below which an embedding counts as zero (F.normalize's floor): padded batch slots
NORM_FLOOR = 1e-12


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a part's parameters, in the order of the flat vector ``theta``."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named tensors of ``theta`` (views, differentiable)."""
        parts = torch.split(theta, self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat vector of named tensors (in layout order)."""
        return torch.cat([params[n].reshape(-1) for n in self.names])


class TrainablePart(Protocol):
    """What the model-mode engine needs from a trainable part."""

    kind: str
    layout: ParamLayout

    def initial(self) -> torch.Tensor:
        """theta_0: the pretrained values, flat (the pull is towards them)."""
        ...

    def embed(
        self, theta: torch.Tensor, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, log_t): unit-norm embeddings of a stack of batches ``(c, B, ...)`` of cached
        features and the log temperature."""
        ...

    def state(self) -> dict:
        """What rebuilds the part (tensors and options), for saving."""
        ...


def normalize(v: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Unit rows (zero rows, padded slots, stay zero); with ``floor`` r > 0,
    v / sqrt(|v|^2 + r^2): the same to (r/|v|)^2 / 2 where |v| >> r, and no singularity at
    v = 0 (see ``ProjectionPart``)."""
    if floor <= 0:  # F.normalize's value, with a norm that has no 0/0 in its second derivative
        return v * torch.rsqrt((v * v).sum(-1, keepdim=True).clamp_min(NORM_FLOOR**2))
    return v * torch.rsqrt((v * v).sum(-1, keepdim=True) + floor * floor)


def second_moment(f: torch.Tensor) -> torch.Tensor:
    """E[f f^T] over rows (all but the last dimension)."""
    f = f.reshape(-1, f.shape[-1])
    return f.transpose(0, 1) @ f / max(len(f), 1)


class ProjectionPart:
    """x = normalize(f_img P_img + b_img), y = normalize(f_txt P_txt + b_txt), t = exp(theta_t).

    ``image_proj`` (d_f_img, d), ``text_proj`` (d_f_txt, d): the model's output projections as
    right-multiplied matrices (open_clip's ``visual.proj`` and ``text_projection``; an
    ``nn.Linear`` projection is its transposed weight plus bias). ``learn_scale=False`` keeps
    the temperature at ``log_scale`` (not a parameter).

    ``floors`` (r_img, r_txt): normalisation as u / sqrt(|u|^2 + r^2). CLIP's exact
    normalisation is singular at u = 0 and blind to |u|, so a fit can rotate one caption's
    embedding almost for free by shrinking its projected feature: on the tiny CLIP the fit
    drove a feature's norm from ~9 to 1e-5 and its gradient up to 30, and never converged.
    With a floor far below the pretrained norms (``model_mode.FLOOR_FRACTION`` of the median)
    the part equals CLIP's to ~1e-3 where features stay near their pretrained norms, and the
    objective is smooth everywhere.
    """

    kind = "projection"

    def __init__(
        self,
        image_proj: torch.Tensor,
        text_proj: torch.Tensor,
        log_scale: float,
        *,
        image_bias: torch.Tensor | None = None,
        text_bias: torch.Tensor | None = None,
        learn_scale: bool = True,
        floors: tuple[float, float] = (0.0, 0.0),
    ):
        if image_proj.shape[1] != text_proj.shape[1]:
            raise ValueError(
                f"projections map to different widths: {tuple(image_proj.shape)} and "
                f"{tuple(text_proj.shape)}"
            )
        self.tensors = {"image_proj": image_proj, "text_proj": text_proj}
        if image_bias is not None:
            self.tensors["image_bias"] = image_bias
        if text_bias is not None:
            self.tensors["text_bias"] = text_bias
        self.log_scale = float(log_scale)
        self.learn_scale = bool(learn_scale)
        self.floors = (float(floors[0]), float(floors[1]))
        names = list(self.tensors)
        shapes = [tuple(t.shape) for t in self.tensors.values()]
        if self.learn_scale:
            names.append("log_scale")
            shapes.append(())
        self.layout = ParamLayout(tuple(names), tuple(shapes))

    def initial(self) -> torch.Tensor:
        flat = [t.reshape(-1).double() for t in self.tensors.values()]
        if self.learn_scale:
            flat.append(torch.tensor([self.log_scale], dtype=torch.float64))
        return torch.cat(flat)

    def embed(self, theta, image, text):
        p = self.layout.unflatten(theta)
        u = image @ p["image_proj"]
        v = text @ p["text_proj"]
        if "image_bias" in p:
            u = u + p["image_bias"]
        if "text_bias" in p:
            v = v + p["text_bias"]
        log_t = p["log_scale"] if self.learn_scale else theta.new_tensor(self.log_scale)
        return normalize(u, self.floors[0]), normalize(v, self.floors[1]), log_t

    def kfac_inputs(self, theta, image, text) -> dict[str, tuple[torch.Tensor, int]]:
        """The projections' input second moments (the cached features), input axis 0: what
        ``encoder_precondition`` factors."""
        return {"image_proj": (second_moment(image), 0), "text_proj": (second_moment(text), 0)}

    def embed_jvp(self, theta, w, image, text):
        """``embed`` and its derivative along ``w`` in closed form (what ``torch.func.jvp``
        gives, without its dual tensors): with u = f P + b and s = sqrt(|u|^2 + r^2),
        x = u / s and dx = du / s - u (u . du) / s^3, du = f dP + db."""
        p, dp = self.layout.unflatten(theta), self.layout.unflatten(w)
        out, tangents = [], []
        for side, f, r in (("image", image, self.floors[0]), ("text", text, self.floors[1])):
            u = f @ p[f"{side}_proj"]
            du = f @ dp[f"{side}_proj"]
            if f"{side}_bias" in p:
                u = u + p[f"{side}_bias"]
                du = du + dp[f"{side}_bias"]
            sq = (u * u).sum(-1, keepdim=True)
            inv = torch.rsqrt(sq + r * r) if r > 0 else torch.rsqrt(sq.clamp_min(NORM_FLOOR**2))
            x = u * inv
            out.append(x)
            tangents.append(du * inv - x * (x * du).sum(-1, keepdim=True) * inv)
        if self.learn_scale:
            log_t, dlog_t = p["log_scale"], dp["log_scale"]
        else:
            log_t, dlog_t = theta.new_tensor(self.log_scale), theta.new_zeros(())
        return (out[0], out[1], log_t), (tangents[0], tangents[1], dlog_t)

    def state(self) -> dict:
        return {
            "kind": self.kind,
            "tensors": {k: v.detach().cpu() for k, v in self.tensors.items()},
            "log_scale": self.log_scale,
            "learn_scale": self.learn_scale,
            "floors": self.floors,
        }

    @classmethod
    def from_state(cls, state: dict) -> ProjectionPart:
        t = state["tensors"]
        return cls(
            t["image_proj"],
            t["text_proj"],
            state["log_scale"],
            image_bias=t.get("image_bias"),
            text_bias=t.get("text_bias"),
            learn_scale=state["learn_scale"],
            floors=tuple(state.get("floors", (0.0, 0.0))),
        )
