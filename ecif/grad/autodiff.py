"""Derivatives of functions of a parameter tensor by torch.func: the generic forms.

``fn`` maps ``theta`` (a tensor; for ``per_sample_grads`` any pytree, e.g. a dict of a
module's parameters for ``torch.func.functional_call``) to an output. The bilinear head has
closed forms for all of these (``ecif.engine.head``); the tests pin those closed forms to
these generic ones on an independent implementation of the objective
(``tests/engine_reference.py``). Parameters without closed forms (projections or LoRA
inside the encoders, docs/math.md section 12) would use them directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import func

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def jvp(fn: TensorFn, theta: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(theta), J v): the output and its directional derivative along ``v`` (forward mode)."""
    return func.jvp(fn, (theta,), (v,))


def vjp(fn: TensorFn, theta: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(theta), J^T u): the output and the pull-back of ``u`` (reverse mode)."""
    out, pull = func.vjp(fn, theta)
    return out, pull(u)[0]


def value_and_grad(fn: TensorFn, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(theta), its gradient) for a scalar ``fn``."""
    g, value = func.grad_and_value(fn)(theta)
    return value, g


def hvp(fn: TensorFn, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact Hessian-vector product of a scalar ``fn`` (forward over reverse).

    ``v`` is shaped like ``theta``, or carries one leading dimension of K vectors (then the K
    products are vectorised with ``vmap``).
    """

    def one(u: torch.Tensor) -> torch.Tensor:
        return func.jvp(func.grad(fn), (theta,), (u,))[1]

    return func.vmap(one)(v) if v.dim() == theta.dim() + 1 else one(v)


def gauss_newton_product(
    fn: TensorFn,
    theta: torch.Tensor,
    v: torch.Tensor,
    out_hvp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """G v = J^T H_out J v for a loss l(fn(theta)), J the Jacobian of ``fn``.

    ``out_hvp(out, u)`` applies the loss's Hessian in the outputs at ``out`` to ``u`` (e.g.
    ``lambda out, u: hvp(loss, out, u)``). G drops the term of the outputs' own curvature, so
    it is positive semi-definite whenever the loss is convex in the outputs: the curvature
    for non-convex parameters (docs/math.md section 12). One JVP and one VJP.
    """
    out, jv = jvp(fn, theta, v)
    return vjp(fn, theta, out_hvp(out, jv))[1]


def dense_hessian(fn: TensorFn, theta: torch.Tensor) -> torch.Tensor:
    """Dense Hessian (numel x numel) of a scalar ``fn``; for small problems and tests."""
    return func.hessian(fn)(theta).reshape(theta.numel(), theta.numel())


def jacobian(fn: TensorFn, theta: torch.Tensor) -> torch.Tensor:
    """d fn_i / d theta as rows (fn's numel x theta's numel), by reverse mode.

    For losses that are not sums of independent per-sample terms (a contrastive batch: each
    pair's term depends on the whole batch), the per-sample gradients are the rows of the
    Jacobian of the vector of per-sample terms.
    """
    out = fn(theta)
    return func.jacrev(fn)(theta).reshape(out.numel(), theta.numel())


def per_sample_grads(
    loss_fn: Callable[..., torch.Tensor], params: Any, *inputs: torch.Tensor
) -> Any:
    """Gradient of ``loss_fn(params, *sample)`` for every sample; ``inputs`` are batched on
    dim 0 and the result is stacked on dim 0 (same pytree structure as ``params``).

    For a module: ``loss_fn = lambda p, x, y: loss(functional_call(model, p, (x[None],)),
    y[None])`` with ``params = dict(model.named_parameters())``.
    """
    in_dims = (None,) + (0,) * len(inputs)
    return func.vmap(func.grad(loss_fn), in_dims=in_dims)(params, *inputs)


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
