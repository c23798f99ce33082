"""Autograd helpers: Hessian-vector products and per-sample gradients via torch.func.

The engine's closed forms are checked against these; the companion methods use them directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call, grad, jvp, vmap


def flat_hvp(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Exact Hessian-vector product of a scalar function of one tensor (forward-over-reverse)."""
    return jvp(grad(loss_fn), (theta,), (v,))[1]


def dense_hessian(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor
) -> torch.Tensor:
    """Dense Hessian (numel x numel) by autograd; for small problems and tests only."""
    return torch.autograd.functional.hessian(loss_fn, theta).reshape(theta.numel(), theta.numel())


def per_sample_grads(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Gradients of ``loss_fn(model(x_i), y_i)`` for every sample i, stacked on dim 0."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one(p, b, x, y):
        out = functional_call(model, (p, b), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, None, 0, 0))(params, buffers, inputs, targets)


class ActivationGradients:
    """Records a module's output activation and the gradient of a loss with respect to it.

    Usage: ``with ActivationGradients(layer) as rec: loss.backward()``; then ``rec.activation``
    and ``rec.grad`` hold the tensors of the last forward/backward.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.activation: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None
        self._handle = None

    def _hook(self, _module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        self.activation = out.detach()
        if out.requires_grad:
            out.register_hook(self._save_grad)

    def _save_grad(self, g: torch.Tensor) -> None:
        self.grad = g.detach()

    def __enter__(self) -> ActivationGradients:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
