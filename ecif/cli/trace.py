"""``ecif trace``: the training pairs that pushed the model towards one mistake."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

from ecif.audit.trace_args import TraceArgs
from ecif.cli import common
from ecif.cli.options import add_field
from ecif.device import resolve_device

NAME = "trace"
HELP = "trace a misprediction back to the training pairs responsible for it"
DESCRIPTION = (
    "Build the test loss of one query, take candidate training pairs from the FAISS indexes "
    "(`ecif index`; built in memory if missing), rank them by relative influence "
    "g^T d_n / ||d_n|| (d_n = H^-1 grad R_n) and print two lists. RESPONSIBLE: most negative "
    "first; removing the pair would lower the query's loss, i.e. it pushed the model towards "
    "the mistake. HELPED: most positive first; removing it would raise the loss. Queries: "
    "--query-id ID --test EMB_FOLDER (the test pair's image against the test captions, or "
    "against --classes prompts with the true --label); --image FILE with --caption TEXT (the "
    "caption should win over the image's nearest training captions) or with --classes/--label "
    "(zero-shot); --caption TEXT alone (text -> image: the caption against its nearest training "
    "images, the correct ones being those captioned with it). Files and free text are embedded "
    "with the model named in the embedding folder's manifest.json. On a model-mode audit "
    "(`ecif score --params projection|lora`) every query kind is taken: a --test folder must "
    "be embedded with the same --cache-features, and files and text go through the frozen "
    "trunk of the model named in the training feature cache; the query's gradient runs through "
    "the fitted part, every training pair is ranked, and the norms come from 32 random probes."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audit", help="audit folder (audit.json, head.pt, index/)")
    p.add_argument("--image", default=None, help="query image file")
    p.add_argument("--caption", default=None, help="query caption (or the right text for --image)")
    p.add_argument("--query-id", default=None, help="id of a pair in the --test set")
    p.add_argument("--test", default=None, help="embedding folder holding --query-id")
    p.add_argument("--classes", default=None, help="text file, one class prompt per line")
    p.add_argument("--label", default=None, help="true class: line number (0-based) or prompt")
    add_field(p, TraceArgs, "k", "-k", type=int)
    add_field(p, TraceArgs, "candidates", type=int)
    add_field(p, TraceArgs, "competitors", type=int)
    add_field(p, TraceArgs, "wrong_answer")
    add_field(p, TraceArgs, "nprobe", type=int)
    add_field(p, TraceArgs, "solver", old=("--method",))
    p.add_argument(
        "--label-col",
        default=None,
        help="--query-id: a --test metadata column (e.g. a class) whose equal values make a "
        "caption right; if not given: the same caption",
    )
    p.add_argument("--embeddings", default=None, help="training embedding folder (override)")
    p.add_argument("--output", "-o", default=None, help="write both lists to .csv or .parquet")
    add_field(p, TraceArgs, "device")
    common.add_quiet(p)


# what a model-mode trace does not read (it ranks every pair of its cache, solving by CG)
HEAD_ONLY = ("candidates", "nprobe", "solver", "wrong_answer", "embeddings")
TRACE_FLAGS = ("k", "candidates", "competitors", "wrong_answer", "nprobe", "solver", "device")


def trace_args_from(args: argparse.Namespace) -> TraceArgs:
    """TraceArgs from the flags, the device resolved (a missing GPU: an error now)."""
    values = {name: getattr(args, name) for name in TRACE_FLAGS}
    return TraceArgs(**{**values, "device": resolve_device(args.device)})


def flag_conflict(args: argparse.Namespace) -> str | None:
    """What is wrong with the query flags taken together, before any loading: a flag the
    chosen query would silently ignore, an empty caption, a folder given as the image."""
    if args.caption is not None and not args.caption.strip():
        return "--caption is empty: give the text (or leave --caption out)"
    if args.query_id is not None and (args.image or args.caption is not None):
        given = "--image" if args.image else "--caption"
        return f"--query-id and {given} are two queries: give one (the test pair has its caption)"
    if args.classes and args.caption is not None:
        return (
            "--caption and --classes are two queries: --classes with --label is zero-shot, "
            "--caption is retrieval; give one"
        )
    if args.classes and not (args.image or args.query_id is not None):
        return "--classes needs an image to classify: --image FILE or --query-id ID --test FOLDER"
    if args.label is not None and not args.classes:
        return "--label is the true class among --classes: give --classes FILE with it"
    if args.test and args.query_id is None:
        return "--test holds the pair --query-id names: give --query-id ID with it"
    for flag, path in (("--image", args.image), ("--classes", args.classes)):
        if path and Path(path).is_dir():
            return f"{flag} {path}: a folder, not a file"
        if path and not Path(path).is_file():
            return f"{flag} {path}: No such file or directory"
    if args.output:
        out = Path(args.output)
        if out.suffix not in (".csv", ".parquet"):
            return f"-o {args.output}: write .csv or .parquet"
        if out.is_dir():
            return f"-o {args.output}: a folder; give a file name ending .csv or .parquet"
        up = next((p for p in out.absolute().parents if p.exists()), None)
        if up is not None and (not up.is_dir() or not os.access(up, os.W_OK)):
            return f"-o {args.output}: {up} is not a folder this user can write in"
    return None


def _classes(args):
    if not args.classes:
        return None, None
    names = [ln.strip() for ln in Path(args.classes).read_text().splitlines() if ln.strip()]
    from ecif.audit.labels import check_class_prompts

    check_class_prompts(names, args.classes)
    if args.label is None:
        raise ValueError("--classes needs the true class --label")
    label = int(args.label) if str(args.label).lstrip("-").isdigit() else None
    if label is None:
        if args.label not in names:
            raise ValueError(f"--label {args.label!r} is neither a line number nor a class")
        label = names.index(args.label)
    return names, label


def build_query(tb, args):
    names, label = _classes(args)
    if args.query_id is not None:
        from ecif.data.embedding_set import EmbeddingSet

        if not args.test:
            raise ValueError("--query-id needs --test EMB_FOLDER (the set holding that id)")
        test = EmbeddingSet.load(args.test)
        qid = args.query_id
        if test.ids.dtype.kind in "iu" and str(qid).lstrip("-").isdigit():
            qid = int(qid)
        classes = tb.embed_texts(names) if names else None
        return tb.query_from_set(
            test, qid, classes=classes, class_names=names, label=label, label_col=args.label_col
        )
    if args.image:
        return tb.query_from_image(
            args.image,
            caption=args.caption,
            classes=names,
            label=label,
        )
    if args.caption:
        return tb.query_from_caption(args.caption)
    raise ValueError("give a query: --image FILE, --caption TEXT, or --query-id ID --test FOLDER")


def _show(table: pd.DataFrame, name: str, title: str) -> None:
    part = table[table["list"] == name]
    print(f"\n{title}")
    if part.empty:
        print("  (none)")
        return
    cols = ["rank", "id", "relative_influence", "influence", "caption"]
    cols += [c for c in ("image_similarity", "text_similarity") if c in part]
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        print(part[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def run(args: argparse.Namespace) -> int:
    from ecif.atomic import atomic_path
    from ecif.audit.folder import AuditFolderError, audit_params
    from ecif.audit.trace import TraceBack
    from ecif.cli.errors import describe
    from ecif.cli.trace_model import run_model
    from ecif.data.index import FaissIndexError
    from ecif.data.layout import FolderError
    from ecif.data.models import ModelLoadError

    start = time.time()
    problem = flag_conflict(args)  # before loading the audit
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if audit_params(args.audit) != "head":  # through the encoders: every training pair
            k = trace_args_from(args).k  # the counts checked as in the head mode
            given = {n: getattr(args, n) for n in HEAD_ONLY}
            unused = [
                f"--{n.replace('_', '-')}"
                for n, v in given.items()
                if v is not None and v != getattr(TraceArgs(), n, None)
            ]
            if unused:
                print(
                    f"note: {', '.join(unused)} only apply to head-mode audits; ignored (a "
                    "model-mode trace ranks every training pair of the audit's own cache)",
                    file=sys.stderr,
                )
            table, info = run_model(args, k, _classes)
        else:
            tb = TraceBack.from_audit(args.audit, trace_args_from(args), embeddings=args.embeddings)
            if tb.indexes is None:
                print("note: no index in the audit folder; building one in memory", file=sys.stderr)
            elif tb.cache_note:
                print(f"note: {tb.cache_note}", file=sys.stderr)
            q = build_query(tb, args)
            table, info = tb.trace(q)
    except (AuditFolderError, FolderError, FaissIndexError, ModelLoadError, KeyError) as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # OSError: a missing or unreadable image file
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    print(f"query: {info['query']}")
    verdict = "correct" if info["correct"] else "WRONG"
    print(
        f"prediction: {info['predicted']!r} ({verdict}); p(correct) = {info['p_correct']:.3f}, "
        f"loss = {info['loss']:.4g}"
    )
    _show(table, "responsible", "RESPONSIBLE (removing them would lower the loss):")
    _show(table, "helped", "HELPED (removing them would raise the loss):")
    if args.output:
        out = Path(args.output)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp:
                if out.suffix == ".parquet":
                    table.to_parquet(tmp, index=False)
                else:
                    table.to_csv(tmp, index=False)
        except OSError as e:
            print(f"error: -o {args.output}: {describe(e)}", file=sys.stderr)
            return 2
    n_resp = int((table["list"] == "responsible").sum())
    n_help = int((table["list"] == "helped").sum())
    print(
        f"\ntraced 1 query over {info['candidates']} candidate pairs ({info['solver']} norms): "
        f"{n_resp} responsible, {n_help} helped shown in {time.time() - start:.1f} s"
        + (f"; written to {args.output}" if args.output else "")
    )
    return 0
