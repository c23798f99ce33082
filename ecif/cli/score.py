"""`ecif score`: score every shard of an embedding folder into an audit folder."""

from __future__ import annotations

import argparse

from ecif.cli.common import add_audit_options, add_quiet, audit_args_from, show_progress

NAME = "score"
HELP = "score every pair of an embedding folder (one output shard per input shard)"
DESCRIPTION = """Fit the ECIF head on an embedding folder (from `ecif embed` or clip-retrieval),
score every pair's influence on a trusted validation set, flag the most harmful, and write
AUDIT/scores/<shard>.parquet (one per input shard, atomic; a rerun skips finished shards),
AUDIT/audit.json and AUDIT/head.pt. Negative influence = removing the pair lowers the
validation loss = harmful; misalign_score grows with suspicion; rank 1 = most suspicious."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", help="embedding folder (img_emb/, text_emb/, metadata/)")
    p.add_argument("--output", "-o", required=True, help="audit folder to write")
    p.add_argument("--val", help="embedding folder of trusted validation pairs (recommended)")
    p.add_argument(
        "--distributor", choices=["local", "dask"], default="local", help="where shard tasks run"
    )
    p.add_argument(
        "--scheduler", help="Dask scheduler address tcp://HOST:PORT (default: a local cluster)"
    )
    add_audit_options(p)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    import ecif
    from ecif.audit.shards import score_shards

    val = ecif.EmbeddingSet.load(args.val) if args.val else None
    score_shards(
        args.embeddings,
        args.output,
        val,
        args=audit_args_from(args),
        distributor=args.distributor,
        scheduler=args.scheduler,
        progress=show_progress(args),
    )
    table, info = ecif.audit.read_audit(args.output)
    print(
        f"validation: {info.get('validation', 'see audit.json')}; flagged {info.get('flagged')} ({info.get('threshold')})"
    )
    top = table.sort_values("rank").head(10)[
        ["id", "caption", "clip_score", "influence", "misalign_score", "rank"]
    ]
    print(top.to_string(index=False))
    return 0
