"""Gradient-of-activation scoring: which coordinates (or directions) of a layer's output a loss
is sensitive to.

Flex-KD ranks teacher hidden dimensions by these scores; the same quantities (|g|, g^2,
g * h, the second-moment matrix E[g g^T]) are generic saliency measures, so they live here.
The recorder works on frozen models: the hooked output is re-rooted as a leaf that requires
grad, so no parameter gradients are computed and the model need not be unfrozen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ecif.grad.autodiff import ActivationGradients

SCORE_MODES = ("abs", "squared", "grad_x_act")


class _LeafHook:
    """Forward hook that re-roots a module's output as a leaf requiring grad."""

    def __init__(self) -> None:
        self.leaf: torch.Tensor | None = None

    def __call__(self, _module, _inputs, output):
        first = output[0] if isinstance(output, tuple) else output
        self.leaf = first.detach().requires_grad_()
        return (self.leaf,) + tuple(output[1:]) if isinstance(output, tuple) else self.leaf


def activation_and_grad(
    module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``loss_fn`` (which must call the model) and return the output of ``module`` and
    d loss / d output, both detached and shaped like the output.

    Gradients stop at ``module``: layers before it get none, so this is cheap for frozen
    models. The shared :class:`ActivationGradients` recorder captures both tensors.
    """
    leaf_hook = _LeafHook()
    handle = module.register_forward_hook(leaf_hook)
    try:
        with torch.enable_grad(), ActivationGradients(module) as rec:
            loss = loss_fn()
            if leaf_hook.leaf is None:
                raise RuntimeError("loss_fn did not run the hooked module")
            torch.autograd.grad(loss, [leaf_hook.leaf])
    finally:
        handle.remove()
    if rec.grad is None or rec.activation is None:
        raise RuntimeError("loss does not depend on the hooked module's output")
    return rec.activation, rec.grad


def dimension_scores(
    grads: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str = "abs",
    activations: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-coordinate scores of the last dimension, summed over every masked position.

    ``abs``: sum |g_j|; ``squared``: sum g_j^2; ``grad_x_act``: sum |g_j * h_j| (first-order
    estimate of the loss change from zeroing coordinate j). ``mask`` has the shape of
    ``grads`` without its last dimension.
    """
    if mode == "abs":
        s = grads.abs()
    elif mode == "squared":
        s = grads.square()
    elif mode == "grad_x_act":
        if activations is None:
            raise ValueError("grad_x_act needs the activations")
        s = (grads * activations).abs()
    else:
        raise ValueError(f"unknown score mode {mode!r}; expected one of {SCORE_MODES}")
    if mask is not None:
        s = s * mask.unsqueeze(-1).to(s.dtype)
    return s.reshape(-1, s.shape[-1]).sum(0)


def gradient_second_moment(grads: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over masked positions of g g^T (d x d); its top eigenvectors are the directions the
    loss is most sensitive to."""
    g = grads.reshape(-1, grads.shape[-1])
    if mask is not None:
        g = g[mask.reshape(-1).bool()]
    return g.T @ g


def top_directions(second_moment: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` eigenvectors (columns, d x k) of a symmetric PSD matrix, largest first."""
    evals, evecs = torch.linalg.eigh(second_moment.double())
    order = torch.argsort(evals, descending=True)[:k]
    return evecs[:, order].to(second_moment.dtype)
