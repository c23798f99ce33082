"""``ecif trace`` on a model-mode audit: only ``--query-id ID --test FOLDER`` (files and free
text would need the frozen trunk, which the audit does not hold)."""

from __future__ import annotations

import argparse

import pandas as pd


def run_model(args: argparse.Namespace, k: int) -> tuple[pd.DataFrame, dict]:
    from ecif.audit.model_trace_pair import trace_model_pair

    if args.query_id is None or args.image or args.caption or args.classes:
        raise ValueError(
            "a model-mode audit traces --query-id ID --test FOLDER only (a test folder "
            "embedded with the same --cache-features); --image, --caption and --classes need "
            "the head mode"
        )
    if not args.test:
        raise ValueError("--query-id needs --test EMB_FOLDER (the set holding that id)")
    return trace_model_pair(args.audit, args.test, args.query_id, k=k, label_col=args.label_col)
