"""`ecif score`: score every shard of an embedding folder into an audit folder."""

from __future__ import annotations

import argparse
import sys
import warnings

from ecif.cli.common import add_audit_options, add_quiet, add_val, audit_args_from, show_progress

NAME = "score"
HELP = "score every pair of an embedding folder (one output shard per input shard)"
DESCRIPTION = """Fit the ECIF head on an embedding folder (from `ecif embed` or clip-retrieval),
score every pair's influence on a trusted validation set, flag the most harmful, and write
AUDIT/scores/<shard>.parquet (one per input shard, atomic; a rerun skips finished shards),
AUDIT/audit.json and AUDIT/head.pt. Negative influence = removing the pair lowers the
validation loss = harmful; misalign_score grows with suspicion; rank 1 = most suspicious.
Options, the validation set's widths and model are checked before the fit."""
INTERRUPTED = "interrupted; rerun the same command to resume (finished shards are kept)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", help="embedding folder (img_emb/, text_emb/, metadata/)")
    p.add_argument("--output", "-o", required=True, help="audit folder to write")
    add_val(p, what=" (recommended)")
    p.add_argument(
        "--distributor", choices=["local", "dask"], default="local", help="where shard tasks run"
    )
    p.add_argument(
        "--scheduler", help="Dask scheduler address tcp://HOST:PORT (if not given: a local cluster)"
    )
    add_audit_options(p)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    from ecif.audit.auditor import MORE_TRUSTED
    from ecif.audit.checks import MISMATCH_ALLOWED
    from ecif.audit.combination_text import describe_combination
    from ecif.audit.folder import influence_columns, read_audit
    from ecif.audit.recorded import RECORDED, audit_notes
    from ecif.audit.selection import describe_fit
    from ecif.audit.shards import score_shards
    from ecif.audit.thresholds import UnreliableThresholdWarning
    from ecif.data.duplicates import COPIES
    from ecif.data.embedding_set import NOT_UNIT
    from ecif.data.folder_reader import IdColumnWarning

    val = args.val  # a folder: score_shards reads it and records what it found
    with warnings.catch_warnings():  # said once, in the summary below
        for said in (NOT_UNIT, MORE_TRUSTED, COPIES):
            warnings.filterwarnings("ignore", message=f".*{said}")
        # recorded in audit.json (the threshold's sentence is the summary's last line)
        for category in (*RECORDED, IdColumnWarning, UnreliableThresholdWarning):
            warnings.simplefilter("ignore", category)
        summary = score_shards(
            args.embeddings,
            args.output,
            val,
            args=audit_args_from(args),
            distributor=args.distributor,
            scheduler=args.scheduler,
            progress=show_progress(args),
            log=lambda s: None,
            allow_model_mismatch=args.allow_model_mismatch,
        )
    table, info = read_audit(args.output)
    cols = ["id", "caption", "clip_score", "pair_loss", "trusted_loss", "knn_disagreement"]
    cols += influence_columns(table)[:1]  # influence, or self-influence without validation
    cols += ["misalign_score", "rank"]
    top = table.sort_values("rank").head(10)[[c for c in cols if c in table]]
    print(top.to_string(index=False))
    fitted = describe_fit(info)
    if fitted:
        print(f"{fitted[0]}: {fitted[1]}")
    if info.get("combination"):
        print(f"misalign_score: {describe_combination(info['combination'])}")
    for note in audit_notes(info):
        if MISMATCH_ALLOWED not in note:  # (a model mismatch was logged as it was found)
            print(f"warning: {note}", file=sys.stderr)
    s = summary.sum(numeric_only=True)
    print(
        f"scored: ok={int(s['ok'])} failed={int(s['failed'])} skipped shards={int(s['skipped'])}"
        f"; {info.get('validation', 'validation: unknown')}; flagged {flagged_text(info)} "
        f"({info.get('threshold')}) -> {args.output}"
    )
    return 0


def flagged_text(info: dict) -> str:
    """The flagged count as rows, and as pairs where flagged pairs have copies (the
    threshold's sentence counts pairs)."""
    rows, pairs = info.get("flagged"), info.get("flagged_pairs")
    if rows is None or pairs is None or pairs == rows:
        return str(rows)
    return f"{rows} rows: {pairs} pairs and {rows - pairs} copies of them"
