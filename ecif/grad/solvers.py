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


def block_conjugate_gradient(
    matvec: LinearOp,
    b: torch.Tensor,
    *,
    precond: LinearOp | None = None,
    tol: float = 1e-6,
    max_iter: int = 500,
    progress: Callable[[float], None] | None = None,
) -> CGResult:
    """Block CG for K right-hand sides ``b`` (K, ...) of one symmetric positive definite
    operator: each iteration searches the span of all K preconditioned residuals, so every
    system gains from the others' Krylov directions (the breakdown-free form of Ji and Li,
    2017: the search block is orthonormalised and its dependent columns dropped). ``matvec``
    and ``precond`` take rows (k, ...) for any k <= K. Fewer products than K separate solves
    where the spectrum has outliers (the model modes' probes: 1.8-2.2x fewer at 1e-2,
    benchmarks/README.md). ``progress`` gets the largest relative residual per iteration."""
    shape = b.shape[1:]
    flat = lambda v: v.reshape(len(v), -1)  # noqa: E731  rows (k, ...) -> (k, n)
    op = lambda v: flat(matvec(v.reshape(-1, *shape)))  # noqa: E731
    pre = (lambda v: flat(precond(v.reshape(-1, *shape)))) if precond else (lambda v: v)
    x, r = torch.zeros_like(flat(b)), flat(b).clone()
    bnorm = r.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
    rel = r.norm(dim=1) / bnorm
    search = _orthonormal_rows(pre(r))
    it = 0
    while it < max_iter and bool((rel > tol).any()) and len(search) > 0:
        q = op(search)
        sq = (search @ q.T).double()  # S^T A S: positive definite, or A is not
        chol, info = torch.linalg.cholesky_ex(0.5 * (sq + sq.T))
        if int(info) != 0:
            break  # not converged: the caller learns A is not positive definite here
        alpha = torch.cholesky_solve((search @ r.T).double(), chol).to(b.dtype)
        x = x + alpha.T @ search
        r = r - alpha.T @ q
        rel = r.norm(dim=1) / bnorm
        it += 1
        if progress is not None:
            progress(float(rel.max()))
        if not bool(torch.isfinite(rel).all()):
            break
        z = pre(r)
        beta = torch.cholesky_solve((q @ z.T).double(), chol).to(b.dtype)
        search = _orthonormal_rows(z - beta.T @ search)  # A-conjugate to the last block
    ok = bool(torch.isfinite(x).all()) and bool((rel <= tol).all())
    return CGResult(x=x.reshape(b.shape), iterations=it, rel_residual=rel, converged=ok)


def _orthonormal_rows(w: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning w's rows, less the directions they barely span (relative
    size under 1e3 eps, 1e-10 at least: at round-off they would break S^T A S)."""
    q, r = torch.linalg.qr(w.T)
    diag = r.diagonal().abs()
    if diag.numel() == 0 or not bool(torch.isfinite(diag).all()):
        return w[:0]
    finfo = torch.finfo(w.dtype)
    keep = diag > max(1e-10, 1e3 * finfo.eps) * diag.max().clamp_min(finfo.tiny)
    return q[:, keep].T.contiguous()


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
    return cholesky_with_damping(h)[0]


def cholesky_with_damping(h: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``damped_cholesky``'s factor and the mu it added (0.0 when H factored as it is), for
    callers that must say when their answer is that of H + mu I, not of H."""
    mu = 0.0
    scale = float(h.diagonal().abs().max())
    for _ in range(30):
        factor, info = torch.linalg.cholesky_ex(
            h + mu * torch.eye(len(h), dtype=h.dtype, device=h.device)
        )
        if int(info) == 0:
            return factor, mu
        mu = max(mu * 10.0, 1e-6 * scale)
    raise RuntimeError("Hessian could not be made positive definite")
