"""`ecif verify`: how far to trust the scores on your data, by real refits."""

from __future__ import annotations

import argparse

from ecif.cli.common import add_quiet, show_progress

NAME = "verify"
HELP = "refit after k sampled removals and report predicted-vs-actual Spearman"
DESCRIPTION = """Retrain the head (warm start, same batch partition, float64) after removing each
of k sampled pairs (half the most harmful, half random) and print the Spearman correlation
between the predicted and the actual change of validation loss. Close to 1: trust the
ranking; low: the influence approximation does not hold on this data."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audit", help="audit folder from `ecif score` or `ecif demo`")
    p.add_argument("--val", required=True, help="embedding folder of trusted validation pairs")
    p.add_argument("-k", type=int, default=20, help="number of removals to refit")
    p.add_argument("--seed", type=int, default=0)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import ecif
    from ecif.audit.folder import read_heads
    from ecif.audit.shards import load_training_set
    from ecif.audit.verify import verify

    _, info = ecif.audit.read_audit(args.audit)
    train = load_training_set(info["embeddings"])
    head = read_heads(args.audit)[0]
    bar = tqdm(total=args.k, desc="refits", disable=not show_progress(args))
    rho, table = verify(
        head,
        train,
        ecif.EmbeddingSet.load(args.val),
        k=args.k,
        seed=args.seed,
        progress=lambda i: bar.update(1),
    )
    bar.close()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3e}"))
    print(
        f"verify: Spearman(predicted, actual) = {rho:.3f} over {len(table)} refits; ok={len(table)} failed=0"
    )
    return 0
