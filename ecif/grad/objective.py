"""What the shared solvers need from an objective, and an objective from a plain function.

The Newton loop and its directions (``ecif.grad.newton``, CG included) take any object with
these methods: the head's ``HeadObjective`` (closed forms streamed over batches,
``ecif.engine.head``) or a ``FunctionObjective`` over a torch function (autodiff,
``ecif.grad.autodiff``), which is how the tests run the same solvers on the reference
objective and how parameters without closed forms would plug in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ecif.grad.autodiff import dense_hessian, hvp, value_and_grad


class Objective(Protocol):
    """A twice-differentiable scalar objective of a flat parameter vector."""

    def value_and_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        """J(theta) and its gradient."""
        ...

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H(theta) v for v of shape (P,) or (K, P)."""
        ...


class DenseObjective(Objective, Protocol):
    """An objective that can also assemble its dense Hessian (small problems)."""

    def dense_hessian(self, theta: torch.Tensor) -> torch.Tensor:
        """H(theta), P x P."""
        ...


class FunctionObjective:
    """An :class:`Objective` (with a dense Hessian) from a scalar torch function, by autodiff."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def value_and_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        value, g = value_and_grad(self.fn, theta)
        return float(value), g

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return hvp(self.fn, theta, v)

    def dense_hessian(self, theta: torch.Tensor) -> torch.Tensor:
        return dense_hessian(self.fn, theta)
