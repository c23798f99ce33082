"""A Kronecker-factored preconditioner for the model modes' curvature (K-FAC over the linear
maps of the trainable part, with the output side reduced to one fitted scalar per map).

For a linear map ``u = f P`` the Gauss-Newton curvature in P is close to ``A (x) G`` with
``A = E[f f^T]`` the map's input second moments and G the curvature in its outputs. Pooled
CLIP features are strongly anisotropic, so A alone sets most of the conditioning; G is
replaced by ``c I`` with c measured by a Rayleigh quotient of the true operator. The
preconditioner is ``(c A + lam I)^-1`` per map (by A's eigendecomposition) and
``1/(c_rest + lam)`` on the remaining entries (biases, temperature). A part names its maps
and their inputs' moments in ``kfac_inputs``: the projection part's read the cached features,
the lora part's adapters read inner token states (A's input: the block's hidden states; B's:
their rank-r image under A), measured in one forward pass over a sample of rows.

The maps' c's come from ``PROBES`` Hessian-vector products on random directions over all
parameters at once: for independent entries, the cross terms between maps average out, so
``v_b^T (H v)_b`` estimates each map's own ``v_b^T H_bb v_b`` from the same products (the
lora part has 16 or more maps; one product per map per probe would cost more than the solve
saves). The rest, a few entries whose joint estimate cross terms would swamp, gets its own
``REST_PROBES`` products. It is used by CG in the solve and in Newton steps, and, as its square root, to
whiten the variables L-BFGS works in (as the head's fit whitens by the embeddings' moments).
"""

from __future__ import annotations

import numpy as np
import torch

from ecif.engine.encoder_model import EncoderObjective

SAMPLE_ROWS = 20_000  # rows that estimate the moments (a part's ``kfac_rows`` can lower it)
PROBES = 4  # random directions over all parameters for the maps' Rayleigh quotients
REST_PROBES = 2  # random directions on the remaining entries alone


class KroneckerPreconditioner:
    """Approximate (G + lam I)^-1 and its square root, map by map (see module doc)."""

    def __init__(self, obj: EncoderObjective, theta: torch.Tensor, *, seed: int = 0):
        model = obj.model
        layout = model.part.layout
        self.layout, self.lam = layout, model.lam
        offsets = np.cumsum((0,) + layout.sizes)
        self.slices = {
            n: slice(int(offsets[i]), int(offsets[i + 1])) for i, n in enumerate(layout.names)
        }
        shapes = dict(zip(layout.names, layout.shapes, strict=True))
        # name -> (eigenvalues, eigenvectors, input axis) of its input moments
        self.eig: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for name, (moment, axis) in _inputs(obj, theta, seed).items():
            s, u = torch.linalg.eigh(moment.to(dtype=theta.dtype, device=theta.device))
            if u.shape[0] != shapes[name][axis]:
                raise ValueError(f"{name}: moments of width {u.shape[0]} for {shapes[name]}")
            self.eig[name] = (s.clamp_min(0), u, axis)
        rest = torch.ones(layout.numel, dtype=torch.bool)
        for name in self.eig:
            rest[self.slices[name]] = False
        self.rest = rest.to(theta.device)
        scales = _rayleigh(obj, theta, self, torch.Generator().manual_seed(seed))
        self.eig = {n: (scales[n] * s, u, a) for n, (s, u, a) in self.eig.items()}
        self.c_rest = scales.get(None, 0.0)

    def _block(self, v: torch.Tensor, name: str) -> torch.Tensor:
        """Map ``name``'s entries of v as (..., d_in, d_out): the input axis first."""
        _, u, axis = self.eig[name]
        shape = self.layout.shapes[self.layout.names.index(name)]
        block = v[..., self.slices[name]].reshape(*v.shape[:-1], *shape)
        return block if axis == 0 else block.transpose(-1, -2)

    def _apply(self, v: torch.Tensor, power: float) -> torch.Tensor:
        out = v.clone()
        for name, (s, u, axis) in self.eig.items():
            block = self._block(v, name)
            scale = (s + self.lam) ** power
            block = u @ (scale[:, None] * (u.transpose(0, 1) @ block))
            if axis != 0:
                block = block.transpose(-1, -2)
            out[..., self.slices[name]] = block.reshape(*v.shape[:-1], -1)
        out[..., self.rest] = v[..., self.rest] * (self.c_rest + self.lam) ** power
        return out

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """(c A + lam)^-1 v per map."""
        return self._apply(v, -1.0)

    def inverse_sqrt(self, v: torch.Tensor) -> torch.Tensor:
        """(c A + lam)^-1/2 v per map: the whitening for L-BFGS."""
        return self._apply(v, -0.5)

    def sqrt(self, v: torch.Tensor) -> torch.Tensor:
        """(c A + lam)^1/2 v per map: the inverse of ``inverse_sqrt``."""
        return self._apply(v, 0.5)

    def quad(self, v: torch.Tensor, name: str | None) -> float:
        """tr(V^T A V) of map ``name``'s block V of v (|v_rest|^2 for None)."""
        if name is None:
            return float((v[self.rest] ** 2).sum())
        s, u, _ = self.eig[name]
        z = u.transpose(0, 1) @ self._block(v, name)
        return float((s[:, None] * z * z).sum())


def _inputs(obj: EncoderObjective, theta: torch.Tensor, seed: int) -> dict:
    """The part's ``kfac_inputs`` on a sample of the partition's rows."""
    model = obj.model
    part = model.part
    if not hasattr(part, "kfac_inputs"):
        return {}
    rows = model.partition.members()
    cap = getattr(part, "kfac_rows", SAMPLE_ROWS)
    if len(rows) > cap:
        rows = np.sort(np.random.default_rng(seed).choice(rows, cap, replace=False))

    def take(arr):
        f = arr[rows] if isinstance(arr, torch.Tensor) else torch.as_tensor(np.asarray(arr[rows]))
        return f.to(dtype=model.dtype, device=model.device).reshape(len(rows), -1)

    with torch.no_grad():
        return part.kfac_inputs(theta.detach(), take(obj.image), take(obj.text))


def _rayleigh(obj, theta, pre: KroneckerPreconditioner, gen) -> dict:
    """c per map with v_b^T (H - lam) v ~ c quad_b(v), from ``PROBES`` products on random v
    over all parameters (cross terms between maps average out), and c for the rest (None)
    from ``REST_PROBES`` products on v supported there alone: the rest is a few entries (the
    temperature, biases), whose joint estimate the cross terms would swamp."""
    num, den = dict.fromkeys(pre.eig, 0.0), dict.fromkeys(pre.eig, 0.0)
    for _ in range(PROBES if pre.eig else 0):
        v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype).to(theta.device)
        hv = obj.hvp(theta, v) - obj.model.lam * v
        for name in pre.eig:
            where = pre.slices[name]
            num[name] += float(v[where] @ hv[where])
            den[name] += pre.quad(v, name)
    out = {n: max(num[n] / max(den[n], 1e-300), 0.0) for n in pre.eig}
    rest_num = rest_den = 0.0
    for _ in range(REST_PROBES if bool(pre.rest.any()) else 0):
        v = torch.zeros_like(theta)
        v[pre.rest] = torch.randn(int(pre.rest.sum()), generator=gen, dtype=theta.dtype).to(
            theta.device
        )
        hv = obj.hvp(theta, v) - obj.model.lam * v
        rest_num += float(v @ hv)
        rest_den += float(v @ v)
    out[None] = max(rest_num / max(rest_den, 1e-300), 0.0)
    return out
