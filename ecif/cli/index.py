"""``ecif index``: FAISS indexes over a training set's embeddings, for ``ecif trace``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ecif.cli import common
from ecif.device import resolve_device

NAME = "index"
HELP = "build FAISS indexes (image and text side) over the training embeddings for trace-back"
DESCRIPTION = (
    "Build two inner-product FAISS indexes over the L2-normalised training embeddings, one per "
    "side, and save them into AUDIT/index/ (or EMB_FOLDER/index/, or --output). `ecif trace` "
    "searches them for the training pairs nearest to a query before ranking those by relative "
    "influence. --kind auto is an exact flat index below 200k pairs and IVF above (nlist ~ "
    "4 sqrt(N), trained on a sample). A GPU index is used when --device resolves to cuda and "
    "faiss has GPU support. For an audit whose heads were cross-fitted on halves, a head on the "
    "whole set is fit once and saved as AUDIT/index/head.pt so traces need no refit. On an audit "
    "in a model mode (--params projection or lora) a trace ranks every pair through the fitted "
    "part, so there is no FAISS index: this precomputes the pairs' probe norms (--norms auto: "
    "32 probes, or a probe count) into AUDIT/index/model_norms.npz, which the first trace "
    "would otherwise compute."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="an audit folder (audit.json) or an embedding folder")
    p.add_argument(
        "--embeddings",
        default=None,
        help="training embedding folder (default: the audit's recorded `embeddings`)",
    )
    p.add_argument("--output", "-o", default=None, help="index folder (default FOLDER/index)")
    p.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf"], help="index type")
    p.add_argument(
        "--nlist", type=common.positive_int, default=None, help="IVF lists (default 4 sqrt(N))"
    )
    p.add_argument(
        "--nprobe", type=common.positive_int, default=32, help="IVF lists searched per query"
    )
    p.add_argument(
        "--chunk-size", type=common.positive_int, default=65536, help="rows added per step"
    )
    p.add_argument(
        "--norms",
        default="auto",
        help="relative-influence denominators ||H^-1 grad R_n|| precomputed for every pair so a "
        "trace query pays only its own numerator: 'auto' (exact when that costs under ~2 "
        "TFLOP, else a 64-probe estimate, ~9%% relative error per pair), 'exact', a probe "
        "count K (error ~1/sqrt(2K)), or 'none' (traces compute them per candidate)",
    )
    p.add_argument(
        "--context-top",
        type=int,
        default=32,
        help="batch members stored per pair and side (the heaviest by softmax weight) for trace "
        "numerators; the rest is bounded (>= the batch size is exact)",
    )
    common.add_device(p)
    common.add_seed(p)
    common.add_quiet(p)


def _precompute(head, train, out: Path, args: argparse.Namespace) -> str:
    from ecif.audit.trace_cache import precompute

    probes = {"exact": 0, "auto": "auto"}.get(args.norms, args.norms)
    if probes != "auto" and not str(probes).isdigit():
        raise ValueError(f"--norms must be auto, exact, none or a probe count; got {args.norms!r}")
    if args.context_top < 1:
        raise ValueError(f"--context-top must be at least 1; got {args.context_top}")
    info = precompute(
        out,
        head,
        train.image,
        train.text,
        probes=probes,
        context_top=args.context_top,
        progress=common.show_progress(args),
    )
    how = "exact" if not info["probes"] else f"{info['probes']}-probe estimates"
    return (
        f"; pair norms ({how}, {info['seconds']:.1f} s) in {out / 'trace.pt'}"
        f", batch context ({info['context_seconds']:.1f} s) in {out / 'context'}"
    )


def _model_mode(folder: Path) -> str | None:
    """The audit's parameter mode when it is a model mode (projection, lora), else None."""
    from ecif.audit.folder import audit_params

    if not (folder / "audit.json").exists():
        return None
    params = audit_params(folder)
    return params if params != "head" else None


def _index_model(folder: Path, params: str, args: argparse.Namespace) -> int:
    """``ecif index`` on a model-mode audit: the pairs' probe norms, nothing else."""
    from ecif.audit.folder import AuditFolderError
    from ecif.audit.model_trace_pair import index_model_audit
    from ecif.data.layout import FolderError

    if args.output is not None:
        print(
            f"error: --output: a {params}-mode audit keeps its norms in {folder / 'index'} "
            "(where traces read them)",
            file=sys.stderr,
        )
        return 2
    if args.norms == "none":
        print(f"nothing to do: a {params}-mode audit has no FAISS index, and --norms none")
        return 0
    if args.norms != "auto" and not args.norms.isdigit():
        print(
            f"error: --norms {args.norms}: a {params}-mode audit takes auto, none or a probe "
            "count (exact norms would need one solve per pair)",
            file=sys.stderr,
        )
        return 2
    probes = None if args.norms == "auto" else int(args.norms)
    if probes is not None and probes < 1:
        print("error: --norms: the probe count must be at least 1", file=sys.stderr)
        return 2
    try:
        info = index_model_audit(folder, probes=probes, show_progress=common.show_progress(args))
    except (AuditFolderError, FolderError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    how = "kept already" if info["reused"] else f"computed in {info['seconds']:.1f} s"
    print(
        f"{params} mode: probe norms of {info['pairs']} pairs ({info['probes']} probes, {how}) "
        f"in {info['path']}; traces rank every pair through the fitted part (no FAISS index)"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from ecif.audit.folder import AuditFolderError, trace_head, training_set
    from ecif.data.embedding_set import EmbeddingSet
    from ecif.data.index import FaissIndexError, build_indexes
    from ecif.data.layout import FolderError

    folder = Path(args.folder)
    params = _model_mode(folder)
    if params is not None:
        return _index_model(folder, params, args)
    start = time.time()
    try:
        is_audit = (folder / "audit.json").exists()
        if is_audit:
            train, emb = training_set(folder, args.embeddings)
        else:
            train = EmbeddingSet.load(args.embeddings or folder)
        out = Path(args.output) if args.output else folder / "index"
        idx = build_indexes(
            train.image,
            train.text,
            out,
            kind=args.kind,
            nlist=args.nlist,
            nprobe=args.nprobe,
            device=resolve_device(args.device),
            chunk=args.chunk_size,
            seed=args.seed,
            progress=common.show_progress(args),
        )
        head_note = ""
        if is_audit:
            had = (folder / "index" / "head.pt").exists()
            head = trace_head(folder, train)
            if not had and (folder / "index" / "head.pt").exists():
                head_note = "; fit a whole-set head for tracing (index/head.pt)"
            if args.norms != "none":
                head_note += _precompute(head, train, out, args)
    except (AuditFolderError, FolderError, FaissIndexError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kinds = ", ".join(f"{s}: {i.info.kind}" for s, i in idx.items())
    print(
        f"indexed {len(train)} pairs ({kinds}) into {out} in {time.time() - start:.1f} s"
        + head_note
    )
    return 0
