"""Trace-back's options (``ecif trace``'s flags, ``TraceBack(args=...)``), one default each."""

from __future__ import annotations

from dataclasses import dataclass

from ecif.audit.audit_args import AuditArgs
from ecif.engine.batch_context import DEFAULT_TOP
from ecif.engine.fit import FitArgs
from ecif.engine.head import DENSE_HESSIAN_MAX_PARAMS
from ecif.engine.inverse_hessian import SOLVER_HELP, SolverArgs
from ecif.options import borrow, option

QUERY_OPTIONS = ("k", "candidates", "wrong_answer")  # what one ``TraceBack.trace`` call may change


@dataclass
class TraceArgs:
    """How a trace-back runs: its solver, where it computes, and how a query is answered."""

    solver: str = borrow(
        SolverArgs,
        "solver",
        help=f"{SOLVER_HELP}, 'auto' (exact up to {DENSE_HESSIAN_MAX_PARAMS} head parameters, "
        "else ekfac: a query's solve must be instant)",
    )
    neg: str = borrow(AuditArgs, "neg")
    device: str = borrow(
        FitArgs,
        "device",
        help="where the indexes and the model for image files and captions run: auto (CUDA "
        "when present, else the CPU), cpu or cuda",
    )
    k: int = option(10, help="pairs per list")
    candidates: int | None = option(
        1000,
        help="nearest-neighbour candidates ranked by relative influence (0: all pairs)",
    )
    competitors: int = option(50, help="nearest answers a file/caption competes with")
    wrong_answer: bool = option(
        False,
        help="also take candidates near the wrong answer's text (splits the budget three ways; "
        "it did not raise recall in benchmarks/bench_trace.py)",
    )
    nprobe: int | None = option(
        None, help="IVF lists searched (IVF indexes); if not given: as the index was built"
    )
    refine: int = option(
        30, help="rows per side re-scored with exact norms when the saved norms are estimates"
    )
    context_top: int = option(
        DEFAULT_TOP,
        help="batch members whose weight enters a numerator exactly (a bound covers the rest)",
    )
    query_threads: int | None = option(
        1, help="torch threads for a query (its operations are small); None: torch's setting"
    )

    def __post_init__(self) -> None:
        """Counts a trace cannot run with (faiss raised OverflowError on a negative nprobe)."""
        least = {"k": 0, "candidates": 0, "competitors": 1, "refine": 0, "context_top": 1}
        least.update(nprobe=1, query_threads=1)
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= low):
                raise ValueError(f"{name} must be a whole number >= {low}; got {value!r}")
