"""Gradient utilities shared by the ECIF engine and the companion methods.

Pure tensor code, no I/O: conjugate gradient and Lanczos on linear operators,
autograd helpers (Hessian-vector products, per-sample gradients), and distances.
"""

from ecif.grad.autodiff import ActivationGradients, dense_hessian, flat_hvp, per_sample_grads
from ecif.grad.distances import angular_distance, cosine_similarity, euclidean_distance
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
]
