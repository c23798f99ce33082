"""``ecif trace`` on a model-mode audit: the query through the frozen trunk and the fitted
part (``ecif.audit.model_queries``), every training pair ranked."""

from __future__ import annotations

import argparse

import pandas as pd


def run_model(args: argparse.Namespace, k: int, classes_and_label) -> tuple[pd.DataFrame, dict]:
    """The trace of the query the flags describe (see ``ecif trace --help``);
    ``classes_and_label``: the CLI's reader of --classes/--label."""
    from ecif.audit import model_queries as mq
    from ecif.audit.model_trace_pair import query_inputs, trace_model
    from ecif.audit.trace_args import TraceArgs
    from ecif.device import resolve_device

    names, label = classes_and_label(args)
    competitors = args.competitors or TraceArgs().competitors

    if args.query_id is not None and not args.test:
        raise ValueError("--query-id needs --test EMB_FOLDER (the set holding that id)")
    if not (args.query_id is not None or args.image or args.caption):
        raise ValueError(
            "give a query: --image FILE, --caption TEXT, or --query-id ID --test FOLDER"
        )
    # the trunk and the training embeddings: for files, text and class prompts only
    needs_trunk = args.query_id is None or bool(names)
    inputs = query_inputs(args.audit, resolve_device(args.device)) if needs_trunk else None
    if args.query_id is not None:
        q = mq.pair_query(
            args.test,
            args.query_id,
            label_col=args.label_col,
            inputs=inputs,
            classes=names,
            label=label,
        )
    elif args.image:
        q = mq.image_query(
            inputs,
            args.image,
            caption=args.caption,
            classes=names,
            label=label,
            competitors=competitors,
        )
    else:
        q = mq.caption_query(inputs, args.caption, competitors=competitors)
    return trace_model(args.audit, q, k=k, inputs=inputs)
