"""`ecif clean`: does dropping the flagged pairs help? Refit and compare with baselines."""

from __future__ import annotations

import argparse

from ecif.cli.clean_retrain import add_retrain_arguments
from ecif.cli.common import add_quiet, add_seed, add_val, show_progress

NAME = "clean"
HELP = "drop the flagged pairs, refit, and compare with random and clip_score drops"
DESCRIPTION = """Drop the audit's flagged pairs (or --count / --fraction of the top), refit the
head, and report validation loss and image->text accuracy beside dropping the same number
of random pairs and of lowest-clip_score pairs, and the one-step ECIF edit (no refit).
Accuracy counts a predicted caption as right when it equals the image's own caption (case
and spacing aside), or carries the same --label-col value. Optionally write the kept ids
(--keep-output) for training on the cleaned set."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audit", help="audit folder from `ecif score` or `ecif demo`")
    add_val(p, required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--count", type=int, help="drop this many top-ranked pairs")
    g.add_argument("--fraction", type=float, help="drop this fraction of top-ranked pairs")
    p.add_argument(
        "--label-col",
        help="validation metadata column (e.g. a class) whose equal values make a retrieved "
        "caption right; if not given: the same caption",
    )
    p.add_argument("--keep-output", help="write the ids kept by the ecif drop to this CSV/parquet")
    add_seed(p)
    add_quiet(p)
    add_retrain_arguments(p)


def audit_training_set(folder: str):
    """The audit table, its info and training set (scored rows, in training order), the head."""
    from ecif.audit.folder import AuditFolderError, read_audit, read_heads
    from ecif.audit.shards import load_training_set

    table, info = read_audit(folder)
    if not info.get("embeddings"):
        raise AuditFolderError(f"{folder}/audit.json records no training embeddings")
    train = load_training_set(info["embeddings"])
    table = table[table["status"] == "ok"].reset_index(drop=True) if "status" in table else table
    table = table.set_index("id").loc[train.ids].reset_index()
    return table, info, train, read_heads(folder)[0]


def drop_count(args: argparse.Namespace, table, n: int) -> int:
    """How many pairs to drop, checked against the audit before any refit."""
    from ecif.cli.errors import UsageError

    if args.fraction is not None:
        if not 0.0 < args.fraction < 1.0:
            raise UsageError(f"--fraction must be in (0, 1); got {args.fraction}")
        count, what = int(round(args.fraction * n)), f"--fraction {args.fraction}"
    elif args.count is not None:
        count, what = args.count, f"--count {args.count}"
    else:
        count, what = int(table["is_misaligned"].sum()), "the audit's flagged count"
    if not 0 < count < n:
        hint = "; pass --count or --fraction" if args.count is None else ""
        raise UsageError(
            f"{what} drops {count} pairs; it must be between 1 and {n - 1} (the audit has "
            f"{n} scored pairs){hint}"
        )
    return count


def run(args: argparse.Namespace) -> int:
    from ecif.audit.clean import compare_cleaning
    from ecif.audit.labels import answer_labels
    from ecif.cli.common import load_val
    from ecif.cli.errors import UsageError

    table, info, train, head = audit_training_set(args.audit)
    count = drop_count(args, table, len(train))
    val = load_val(args, train, info["embeddings"])
    if args.label_col:
        try:
            answer_labels(val, args.label_col)
        except ValueError as e:
            raise UsageError(f"--label-col: {e} of {args.val}") from None
    result = compare_cleaning(
        head,
        train,
        val,
        table,
        count=count,
        seed=args.seed,
        label_col=args.label_col,
        progress=show_progress(args),
    )
    print(result.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.keep_output:
        keep = table.sort_values("rank").iloc[count:]["id"]
        frame = keep.to_frame("id")
        (frame.to_parquet if args.keep_output.endswith(".parquet") else frame.to_csv)(
            args.keep_output, index=False
        )
        print(f"kept {len(keep)} ids -> {args.keep_output}")
    if args.retrain_model:
        from ecif.cli.clean_retrain import run_retrain

        if run_retrain(args, table, info, count):
            return 2
    print(f"clean: dropped {count} of {len(train)}; ok={len(train) - count} failed=0")
    return 0
