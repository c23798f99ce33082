"""The gradient core shared by the ECIF engine and the companion methods.

Pure tensor code, no I/O, nothing from the rest of ``ecif``:

- ``solvers``: conjugate gradient (batched, preconditioned) and Lanczos on linear operators,
  the damped Cholesky factor of a dense Hessian;
- ``newton``: Newton's method with a step test that works in float32, and its dense and CG
  directions, on any ``objective.Objective``;
- ``objective``: what the solvers need from an objective; ``FunctionObjective`` over a torch
  function;
- ``autodiff``: torch.func forms of JVPs, VJPs, Hessian- and Gauss-Newton-vector products,
  dense Hessians, Jacobians and per-sample gradients (the head's closed forms are tested
  against these), and the activation-gradient recorder;
- ``activation_scores``, ``divergences``, ``distances``: what the companions share.
"""

import warnings

from ecif.grad.activation_scores import (
    activation_and_grad,
    dimension_scores,
    gradient_second_moment,
    top_directions,
)
from ecif.grad.autodiff import (
    ActivationGradients,
    dense_hessian,
    gauss_newton_product,
    hvp,
    jacobian,
    jvp,
    per_sample_grads,
    value_and_grad,
    vjp,
)
from ecif.grad.distances import (
    angular_distance,
    cosine_similarity,
    euclidean_distance,
    log_norm_ratio,
)
from ecif.grad.divergences import (
    forward_kl,
    generalized_jsd,
    masked_divergence,
    masked_mean,
    reverse_kl,
    token_divergence,
)
from ecif.grad.newton import cg_direction, dense_direction, newton
from ecif.grad.objective import DenseObjective, FunctionObjective, Objective
from ecif.grad.solvers import (
    CGResult,
    block_conjugate_gradient,
    cholesky_with_damping,
    conjugate_gradient,
    damped_cholesky,
    lanczos_eigs,
)

__all__ = [
    "ActivationGradients",
    "CGResult",
    "DenseObjective",
    "FunctionObjective",
    "Objective",
    "activation_and_grad",
    "angular_distance",
    "block_conjugate_gradient",
    "cg_direction",
    "conjugate_gradient",
    "cholesky_with_damping",
    "cosine_similarity",
    "damped_cholesky",
    "dense_direction",
    "dense_hessian",
    "dimension_scores",
    "euclidean_distance",
    "forward_kl",
    "gauss_newton_product",
    "generalized_jsd",
    "gradient_second_moment",
    "hvp",
    "jacobian",
    "jvp",
    "lanczos_eigs",
    "log_norm_ratio",
    "masked_divergence",
    "masked_mean",
    "newton",
    "per_sample_grads",
    "reverse_kl",
    "token_divergence",
    "top_directions",
    "value_and_grad",
    "vjp",
]

_RENAMED = {"flat_hvp": "hvp"}  # old name -> new name, kept for one release


def __getattr__(name: str):
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(
            f"ecif.grad.{name} is deprecated; use ecif.grad.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module 'ecif.grad' has no attribute {name!r}")
