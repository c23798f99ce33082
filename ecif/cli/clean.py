"""`ecif clean`: does dropping the flagged pairs help? Refit and compare with baselines."""

from __future__ import annotations

import argparse

from ecif.cli.clean_retrain import add_retrain_arguments
from ecif.cli.common import add_quiet

NAME = "clean"
HELP = "drop the flagged pairs, refit, and compare with random and clip_score drops"
DESCRIPTION = """Drop the audit's flagged pairs (or --count / --fraction of the top), refit the
head, and report validation loss and image->text accuracy beside dropping the same number
of random pairs and of lowest-clip_score pairs, and the one-step ECIF edit (no refit).
Optionally write the kept ids (--keep-output) for training on the cleaned set."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audit", help="audit folder from `ecif score` or `ecif demo`")
    p.add_argument("--val", required=True, help="embedding folder of trusted validation pairs")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--count", type=int, help="drop this many top-ranked pairs")
    g.add_argument("--fraction", type=float, help="drop this fraction of top-ranked pairs")
    p.add_argument("--keep-output", help="write the ids kept by the ecif drop to this CSV/parquet")
    p.add_argument("--seed", type=int, default=0)
    add_quiet(p)
    add_retrain_arguments(p)


def run(args: argparse.Namespace) -> int:
    import ecif
    from ecif.audit.clean import compare_cleaning
    from ecif.audit.folder import read_heads
    from ecif.audit.shards import load_training_set

    table, info = ecif.audit.read_audit(args.audit)
    train = load_training_set(info["embeddings"])
    table = table[table["status"] == "ok"].reset_index(drop=True) if "status" in table else table
    table = table.set_index("id").loc[train.ids].reset_index()
    head = read_heads(args.audit)[0]
    count = args.count
    if args.fraction is not None:
        count = int(round(args.fraction * len(train)))
    result = compare_cleaning(
        head, train, ecif.EmbeddingSet.load(args.val), table, count=count, seed=args.seed
    )
    print(result.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.keep_output:
        k = count if count is not None else int(table["is_misaligned"].sum())
        keep = table.sort_values("rank").iloc[k:]["id"]
        frame = keep.to_frame("id")
        (frame.to_parquet if args.keep_output.endswith(".parquet") else frame.to_csv)(
            args.keep_output, index=False
        )
        print(f"kept {len(keep)} ids -> {args.keep_output}")
    if args.retrain_model:
        from ecif.cli.clean_retrain import run_retrain

        if run_retrain(args, table, info, count):
            return 2
    dropped = int(result["dropped"].max())
    print(f"clean: dropped {dropped} of {len(train)}; ok={len(train) - dropped} failed=0")
    return 0
