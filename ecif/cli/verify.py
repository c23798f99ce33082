"""`ecif verify`: how far to trust the scores on your data, by real refits."""

from __future__ import annotations

import argparse

from ecif.cli.common import add_quiet, add_seed, add_val, show_progress

NAME = "verify"
HELP = "refit after k sampled removals and report predicted-vs-actual Spearman"
DESCRIPTION = """Retrain the head (warm start, same batch partition, float64) after removing each
of k sampled pairs (half the most harmful, half random) and print the Spearman correlation
between the predicted and the actual change of validation loss. Close to 1: trust the
ranking; low: the influence approximation does not hold on this data. In a model mode
(`ecif score --params projection|lora`) the trainable part is refit instead, from the feature
caches of the training set and of --val."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audit", help="audit folder from `ecif score` or `ecif demo`")
    add_val(p, required=True)
    p.add_argument("-k", type=int, default=20, help="number of removals to refit (at least 3)")
    add_seed(p)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ecif.audit.folder import audit_params
    from ecif.audit.verify import verify, verify_model
    from ecif.cli.clean import audit_training_set
    from ecif.cli.common import load_val
    from ecif.cli.errors import UsageError
    from ecif.cli.model_folder import features_of, model_audit

    if audit_params(args.audit) == "head":
        _, info, train, fitted = audit_training_set(args.audit)
        n, check = len(train), verify
        val = load_val(args, train, info["embeddings"])
    else:
        from ecif.data.embedding_set import EmbeddingSet

        train, fitted, info = model_audit(args.audit)
        n, check = len(train.image), verify_model
        load_val(args, EmbeddingSet.load(info["embeddings"]), info["embeddings"])  # the checks
        val = features_of(args.val)
    if not 3 <= args.k <= n:
        raise UsageError(f"-k {args.k}: must be between 3 and {n} (the audit's scored pairs)")
    show = show_progress(args)
    bar = tqdm(total=args.k, desc="refits", disable=not show)
    try:
        rho, table = check(
            fitted,
            train,
            val,
            k=args.k,
            seed=args.seed,
            progress=lambda i: bar.update(1),
            spinner=show,
        )
    finally:
        bar.close()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3e}"))
    print(
        f"verify: Spearman(predicted, actual) = {rho:.3f} over {len(table)} refits; ok={len(table)} failed=0"
    )
    return 0
