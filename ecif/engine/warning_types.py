"""The engine's warnings: each says that a number it returns is not what it claims to be, so
an audit can record them beside its results (``ecif.audit.recorded``) instead of leaving
them in a terminal."""

from __future__ import annotations

NOT_CONVERGED = "did not converge"  # in every ConvergenceWarning's text: what readers match


class ConvergenceWarning(UserWarning):
    """The head fit stopped short of its gradient tolerance: the head is not at a stationary
    point, so influence scores (which assume one) are not to be trusted as they stand."""


class UnreliableInfluenceWarning(UserWarning):
    """The inverse-Hessian solve behind the influence scores is not the one asked for: the
    exact Hessian factored only with damping added, or CG stopped short of its tolerance."""


def cg_not_converged(rel_residual: float, iterations: int, tol: float, what: str) -> str:
    """What a user is told when CG stopped at ``max_iter`` above its tolerance."""
    return (
        f"{what}: CG stopped after {iterations} iterations at relative residual "
        f"{rel_residual:.2e} (tolerance {tol:.0e}), so influence is approximate; raise the "
        "solver's max_iter, or a larger lam (a better-conditioned Hessian)"
    )
