"""What `ecif index` precomputes so a trace query pays only its own work.

Beside the FAISS indexes, AUDIT/index/ holds ``trace.pt``: the EK-FAC factors of the trace
head's Hessian and ||d_n|| = ||H^-1 grad R_n|| for every training pair (the relative-influence
denominator, which does not depend on the query), tagged with a fingerprint of the head so a
refit head never meets stale numbers. Norms are exact (about 4 B d^2 flops a pair) when that
fits a budget, else estimated from K random probes (relative error about 1/sqrt(2K)).
``context/`` holds each pair's batch context (ecif.engine.batch_context) as memory-mapped .npy
files, so a query's numerator never recomputes a candidate's batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ecif.atomic import atomic_dir, atomic_path
from ecif.engine.batch_context import DEFAULT_TOP, context_names, fill_context, new_context
from ecif.engine.head import DENSE_HESSIAN_MAX_PARAMS, Head
from ecif.engine.inverse_hessian import InverseHessian, SolverArgs
from ecif.engine.relative import exact_norms, probe_norms
from ecif.options import renamed

CACHE_NAME = "trace.pt"
EXACT_FLOP_BUDGET = 2e12  # ~10-30 s on a laptop CPU
DEFAULT_PROBES = 64
TRACE_HESSIAN_BATCHES = 256  # EK-FAC on up to 65k pairs (batch 256): bench_subsample.py


def fingerprint(head: Head) -> str:
    """Changes whenever the head's parameters, partition or settings change."""
    h = hashlib.sha1()
    h.update(head.m.detach().cpu().contiguous().numpy().tobytes())
    h.update(np.asarray(head.partition.index).tobytes())
    h.update(repr((head.log_scale, head.learn_scale, head.lam, head.n_norm)).encode())
    return h.hexdigest()[:16]


@renamed(method="solver")
def trace_solver(head: Head, x, y, solver: str = "auto", **kw: Any) -> InverseHessian:
    """The trace-back solver: exact for small heads, else EK-FAC on a batch subsample (no
    per-query CG: a query's solve is two d x d rotations). ``kw``: other SolverArgs fields."""
    if solver == "auto":
        solver = "exact" if head.num_params <= DENSE_HESSIAN_MAX_PARAMS else "ekfac"
    if solver != "exact" and "hessian_batches" not in kw:
        nb = head.partition.num_batches
        kw["hessian_batches"] = TRACE_HESSIAN_BATCHES if nb > TRACE_HESSIAN_BATCHES else None
    return InverseHessian(head, x, y, SolverArgs(solver=solver, **kw))


def choose_probes(head: Head, probes: int | str | None) -> int:
    """0 = exact norms; 'auto' = exact within EXACT_FLOP_BUDGET, else DEFAULT_PROBES."""
    if probes in (None, "auto"):
        di, dt = head.m.shape
        cost = 4.0 * head.partition.n * head.partition.width * di * dt
        return 0 if cost <= EXACT_FLOP_BUDGET else DEFAULT_PROBES
    probes = int(probes)
    if probes < 0:
        raise ValueError("probes must be 0 (exact) or a positive count")
    return probes


def pair_norms(
    head: Head,
    x,
    y,
    inverse: InverseHessian,
    *,
    probes: int | str | None = "auto",
    neg: str = "exact",
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """||d_n|| for every pair, with a progress bar, and a record of how it was computed."""
    k = choose_probes(head, probes)
    start = time.time()
    bar = tqdm(
        total=head.partition.num_batches,
        desc="pair norms" + (f" ({k} probes)" if k else " (exact)"),
        unit="batch",
        disable=not progress,
    )
    with bar:
        if k:
            norms = probe_norms(head, x, y, inverse, probes=k, neg=neg, progress=bar.update)
        else:
            norms = exact_norms(head, x, y, inverse, neg=neg, progress=bar.update)
    info = {"norms": "probes" if k else "exact", "probes": k, "seconds": time.time() - start}
    return norms, info


def save_trace_cache(
    folder: str | os.PathLike, head: Head, inverse: InverseHessian, norms: np.ndarray, info: dict
) -> Path:
    """Write ``trace.pt`` atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "fingerprint": fingerprint(head),
        "n": head.partition.n,
        "norms": torch.from_numpy(np.asarray(norms, dtype=np.float64)),
        "solver": inverse.ekfac_state() if inverse.method == "ekfac" else None,
        "info": dict(info, solver=inverse.method),
    }
    path = folder / CACHE_NAME
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_trace_cache(
    folder: str | os.PathLike, head: Head, x, y
) -> tuple[InverseHessian | None, np.ndarray | None, dict]:
    """(solver, norms, info) from ``trace.pt`` when it belongs to this head; else Nones and
    ``info["stale"]`` saying why (the caller falls back to per-candidate norms)."""
    path = Path(folder) / CACHE_NAME
    if not path.exists():
        return None, None, {"stale": "no trace.pt (run `ecif index`)"}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cut off while written, or replaced: computed per candidate
        return (
            None,
            None,
            {"stale": f"{path} cannot be read ({type(e).__name__}); rerun `ecif index`"},
        )
    if not isinstance(state, dict):
        return None, None, {"stale": f"{path} holds no trace cache; rerun `ecif index`"}
    if state.get("fingerprint") != fingerprint(head) or state.get("n") != head.partition.n:
        return None, None, {"stale": f"{path} was computed for another head; rerun `ecif index`"}
    inv = None
    if state["solver"] is not None:
        inv = InverseHessian.from_ekfac_state(head, x, y, state["solver"])
    return inv, state["norms"].numpy(), dict(state["info"])


CONTEXT_FORMAT = 2  # 2: each pair's heaviest batch members stored (1: log-partitions only)


def build_context(
    folder: str | os.PathLike,
    head: Head,
    x,
    y,
    *,
    top: int = DEFAULT_TOP,
    progress: bool = True,
) -> tuple[dict, float]:
    """Write ``context/`` (memory-mapped .npy, vectors in the embeddings' precision when that
    is float16, else float32) atomically; returns the opened arrays and the seconds taken."""
    folder = Path(folder)
    start = time.time()
    vec = np.float16 if np.dtype(getattr(x, "dtype", np.float32)) == np.float16 else np.float32
    names = iter(context_names())
    with atomic_dir(folder / "context") as tmp:

        def alloc(shape, dtype):
            path = tmp / f"{next(names)}.npy"
            return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

        ctx = new_context(head.partition.n, *head.m.shape, top=top, vector_dtype=vec, alloc=alloc)
        bar = tqdm(
            total=head.partition.num_batches,
            desc="batch context",
            unit="batch",
            disable=not progress,
        )
        with bar:
            fill_context(head, x, y, ctx, progress=bar.update)
        norm_max = [float(v) for v in ctx.pop("norm_max", (0.0, 0.0))]
        es_max = float(ctx.pop("es_max", 0.0))
        for arr in ctx.values():
            arr.flush()
        del ctx
        meta = {
            "format": CONTEXT_FORMAT,
            "fingerprint": fingerprint(head),
            "norm_max": norm_max,
            "es_max": es_max,
            "top": top,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
    return load_context(folder, head), time.time() - start


def load_context(folder: str | os.PathLike, head: Head) -> dict | None:
    """The stored batch context when it belongs to this head, else None."""
    path = Path(folder) / "context"
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
    if meta.get("fingerprint") != fingerprint(head) or meta.get("format") != CONTEXT_FORMAT:
        return None  # another head's, or an older layout: `ecif index` rebuilds it
    out = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in context_names()}
    out["norm_max"] = np.asarray(meta["norm_max"])
    out["es_max"] = float(meta["es_max"])
    return out


def precompute(
    out: str | os.PathLike,
    head: Head,
    x,
    y,
    *,
    probes: int | str | None = "auto",
    context_top: int = DEFAULT_TOP,
    progress: bool = True,
) -> dict:
    """Everything `ecif index` saves beside the FAISS indexes in ``out``: the trace solver,
    every pair's norm (trace.pt) and the batch context; returns what was done and its cost."""
    if context_top < 1:
        raise ValueError(f"context_top must be at least 1; got {context_top}")
    inv = trace_solver(head, x, y)
    norms, info = pair_norms(head, x, y, inv, probes=probes, progress=progress)
    save_trace_cache(out, head, inv, norms, info)
    _, seconds = build_context(out, head, x, y, top=context_top, progress=progress)
    return {**info, "context_seconds": seconds}
