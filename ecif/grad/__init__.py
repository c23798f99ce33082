"""Gradient utilities shared by the ECIF engine and the companion methods.

Pure tensor code, no I/O: conjugate gradient and Lanczos on linear operators,
autograd helpers (Hessian-vector products, per-sample gradients), and distances.
"""

from ecif.grad.activation_scores import (
    activation_and_grad,
    dimension_scores,
    gradient_second_moment,
    top_directions,
)
from ecif.grad.autodiff import ActivationGradients, dense_hessian, flat_hvp, per_sample_grads
from ecif.grad.distances import angular_distance, cosine_similarity, euclidean_distance
from ecif.grad.divergences import (
    forward_kl,
    generalized_jsd,
    masked_divergence,
    masked_mean,
    reverse_kl,
    token_divergence,
)
from ecif.grad.solvers import CGResult, conjugate_gradient, lanczos_eigs

__all__ = [
    "ActivationGradients",
    "dense_hessian",
    "euclidean_distance",
    "CGResult",
    "angular_distance",
    "conjugate_gradient",
    "cosine_similarity",
    "flat_hvp",
    "lanczos_eigs",
    "per_sample_grads",
    "activation_and_grad",
    "dimension_scores",
    "gradient_second_moment",
    "top_directions",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "token_divergence",
    "masked_mean",
    "masked_divergence",
]
