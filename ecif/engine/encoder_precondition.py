"""A Kronecker-factored preconditioner for the model modes' curvature (K-FAC over the linear
maps of the trainable part, with the output side reduced to one fitted scalar).

For a linear map ``u = f P`` the Gauss-Newton curvature in P is close to ``A (x) G`` with
``A = E[f f^T]`` the input features' second moments and G the curvature in the outputs. Pooled
CLIP features are strongly anisotropic, so A alone sets most of the conditioning; G is
replaced by ``c I`` with c measured by a Rayleigh quotient of the true operator on random
directions in that block. The preconditioner is ``(c A + lam I)^-1`` per block (by A's
eigendecomposition) and ``1/(c_rest + lam)`` on the remaining entries (biases, temperature).
It is used by CG in the solve and in Newton steps, and, as its square root, to whiten the
variables L-BFGS works in (as the head's fit whitens by the embeddings' moments).
"""

from __future__ import annotations

import numpy as np
import torch

from ecif.engine.encoder_model import EncoderObjective

SAMPLE_ROWS = 20_000  # rows that estimate A
PROBES = 3  # random directions per Rayleigh quotient


class KroneckerPreconditioner:
    """Approximate (G + lam I)^-1 and its square root, block by block (see module doc)."""

    def __init__(self, obj: EncoderObjective, theta: torch.Tensor, *, seed: int = 0):
        model = obj.model
        part, layout = model.part, model.part.layout
        self.layout, self.lam = layout, model.lam
        blocks = getattr(part, "linear_blocks", {})
        moments = _moments(obj, {side for side in blocks.values()}, seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.eig: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        mask_rest = torch.ones(layout.numel, dtype=torch.bool)
        offsets = np.cumsum((0,) + layout.sizes)
        self.slices = {
            n: slice(int(offsets[i]), int(offsets[i + 1])) for i, n in enumerate(layout.names)
        }
        for name, side in blocks.items():
            s, u = torch.linalg.eigh(moments[side])
            s = s.clamp_min(0)
            sl = self.slices[name]
            mask_rest[sl] = False
            c = _rayleigh(obj, theta, sl, lambda v, s=s, u=u: _a_quad(v, s, u), gen)
            self.eig[name] = (c * s, u)
        self.rest = mask_rest.to(theta.device)
        self.c_rest = (
            _rayleigh(obj, theta, self.rest, lambda v: float(v @ v), gen)
            if bool(self.rest.any())
            else 0.0
        )

    def _apply(self, v: torch.Tensor, power: float) -> torch.Tensor:
        out = v.clone()
        for name, (s, u) in self.eig.items():
            sl = self.slices[name]
            block = v[..., sl].reshape(*v.shape[:-1], u.shape[0], -1)
            scale = (s + self.lam) ** power
            block = u @ (scale[:, None] * (u.transpose(0, 1) @ block))
            out[..., sl] = block.reshape(*v.shape[:-1], -1)
        out[..., self.rest] = v[..., self.rest] * (self.c_rest + self.lam) ** power
        return out

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """(c A + lam)^-1 v per block."""
        return self._apply(v, -1.0)

    def inverse_sqrt(self, v: torch.Tensor) -> torch.Tensor:
        """(c A + lam)^-1/2 v per block: the whitening for L-BFGS."""
        return self._apply(v, -0.5)

    def sqrt(self, v: torch.Tensor) -> torch.Tensor:
        """(c A + lam)^1/2 v per block: the inverse of ``inverse_sqrt``."""
        return self._apply(v, 0.5)


def _moments(obj: EncoderObjective, sides: set[str], seed: int) -> dict[str, torch.Tensor]:
    model = obj.model
    part = model.partition
    rows = part.members()
    if len(rows) > SAMPLE_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, SAMPLE_ROWS, replace=False))
    out = {}
    for side in sides:
        arr = obj.image if side == "image" else obj.text
        f = torch.as_tensor(
            np.asarray(arr[rows]) if not isinstance(arr, torch.Tensor) else arr[rows]
        )
        f = f.to(dtype=model.dtype, device=model.device).reshape(len(rows), -1)
        out[side] = f.T @ f / len(rows)
    return out


def _a_quad(v: torch.Tensor, s: torch.Tensor, u: torch.Tensor) -> float:
    """tr(V^T A V) for the block V (d_in x d_out) given A = U diag(s) U^T."""
    z = u.transpose(0, 1) @ v.reshape(u.shape[0], -1)
    return float((s[:, None] * z * z).sum())


def _rayleigh(obj, theta, where, quad, gen) -> float:
    """c with v^T (H - lam) v ~ c quad(v), averaged over random v supported on ``where``."""
    num = den = 0.0
    for _ in range(PROBES):
        v = torch.zeros_like(theta)
        r = torch.randn(v[where].shape, generator=gen, dtype=theta.dtype).to(theta.device)
        v[where] = r
        hv = obj.hvp(theta, v) - obj.model.lam * v
        num += float(v @ hv)
        den += quad(r)
    return max(num / max(den, 1e-300), 0.0)
