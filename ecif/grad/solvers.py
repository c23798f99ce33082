"""Solvers for H x = b: CG and Lanczos on matrix-free linear operators (batched right-hand
sides), and a damped Cholesky factor for dense ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LinearOp = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CGResult:
    """Solution of A x = b with the residual history, so callers can report convergence."""

    x: torch.Tensor
    iterations: int
    rel_residual: torch.Tensor  # per right-hand side
    converged: bool


def _dot(a: torch.Tensor, b: torch.Tensor, batch_dims: int) -> torch.Tensor:
    dims = tuple(range(batch_dims, a.dim()))
    return (a * b).sum(dim=dims) if dims else a * b


def _expand(v: torch.Tensor, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.dim() - batch_dims))


def conjugate_gradient(
    matvec: LinearOp,
    b: torch.Tensor,
    *,
    precond: LinearOp | None = None,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 500,
    batch_dims: int = 0,
    flexible: bool = False,
) -> CGResult:
    """Preconditioned CG for a symmetric positive definite operator.

    ``b`` may carry ``batch_dims`` leading dimensions of independent right-hand sides; the
    operator must accept and return that shape. Stops when every relative residual is
    below ``tol``. ``flexible``: the preconditioner may change from call to call (an inner
    iterative solve); CG then takes the Polak-Ribiere beta, which keeps it converging.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    z = precond(r) if precond is not None else r
    p = z.clone()
    rz = _dot(r, z, batch_dims)
    bnorm = _dot(b, b, batch_dims).sqrt().clamp_min(torch.finfo(b.dtype).tiny)
    rel = _dot(r, r, batch_dims).sqrt() / bnorm
    it = 0
    while it < max_iter and bool((rel > tol).any()):
        ap = matvec(p)
        pap = _dot(p, ap, batch_dims)
        active = rel > tol
        alpha = torch.where(active, rz / pap.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
        x = x + _expand(alpha, x, batch_dims) * p
        r_old = r
        r = r - _expand(alpha, r, batch_dims) * ap
        z = precond(r) if precond is not None else r
        rz_new = _dot(r, z, batch_dims)
        # Polak-Ribiere (r_new - r_old)^T z_new when flexible; Fletcher-Reeves otherwise
        num = rz_new - _dot(r_old, z, batch_dims) if flexible else rz_new
        beta = torch.where(active, num / rz.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
        p = z + _expand(beta, p, batch_dims) * p
        rz = rz_new
        rel = _dot(r, r, batch_dims).sqrt() / bnorm
        it += 1
    return CGResult(x=x, iterations=it, rel_residual=rel, converged=bool((rel <= tol).all()))


def lanczos_eigs(
    matvec: LinearOp,
    shape: tuple[int, ...],
    k: int,
    *,
    iters: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Returns (eigenvalues descending, eigenvectors shaped ``(k, *shape)``).
    """
    n = 1
    for s in shape:
        n *= s
    m = min(n, iters or max(2 * k + 10, 20))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=dtype).to(device)
    q = q / q.norm()
    basis = torch.zeros(m, n, dtype=dtype, device=device)
    alphas = torch.zeros(m, dtype=dtype, device=device)
    betas = torch.zeros(m, dtype=dtype, device=device)
    used = m
    for j in range(m):
        basis[j] = q
        w = matvec(q.reshape(shape)).reshape(-1).to(dtype)
        alphas[j] = q @ w
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)  # full reorthogonalisation
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = w.norm()
        if j + 1 < m:
            betas[j] = beta
            if beta < 1e-12 * max(1.0, float(alphas[: j + 1].abs().max())):
                used = j + 1
                break
            q = w / beta
    t = (
        torch.diag(alphas[:used])
        + torch.diag(betas[: used - 1], 1)
        + torch.diag(betas[: used - 1], -1)
    )
    evals, evecs = torch.linalg.eigh(t)
    order = torch.argsort(evals, descending=True)[:k]
    vecs = (evecs[:, order].T @ basis[:used]).reshape((len(order),) + tuple(shape))
    return evals[order], vecs


def damped_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of H, or of H + mu I (mu from 1e-6 of the largest diagonal entry, ten
    times larger each try) when H is not positive definite: e.g. the head with a learned
    scale far from its optimum, convex in M but not jointly in (M, log t)."""
    mu = 0.0
    scale = float(h.diagonal().abs().max())
    for _ in range(30):
        factor, info = torch.linalg.cholesky_ex(
            h + mu * torch.eye(len(h), dtype=h.dtype, device=h.device)
        )
        if int(info) == 0:
            return factor
        mu = max(mu * 10.0, 1e-6 * scale)
    raise RuntimeError("Hessian could not be made positive definite")
