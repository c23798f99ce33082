"""`ecif demo`: the whole pipeline on the embedded shapes data with the tiny CLIP."""

from __future__ import annotations

import argparse

from ecif.cli.common import add_quiet, add_seed, show_progress

NAME = "demo"
HELP = "run the whole audit on the embedded demo data (no downloads)"
DESCRIPTION = """Make the shapes dataset with mixed caption noise (shuffled captions, near-miss
shapes, one wrong attribute, boilerplate text), embed it with the tiny CLIP (trained offline
once and cached), choose and fit the head, score, index, and write an audit folder that
`ecif app` opens. Prints AUROC and AP of misalign_score and of each signal alone against the
known corruptions."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", default="ecif-demo", help="folder to write")
    p.add_argument("--n", type=int, default=3000, help="training pairs")
    p.add_argument("--noise", type=float, default=0.2, help="fraction of corrupted captions")
    p.add_argument(
        "--noise-kind",
        choices=["shuffle", "confusable", "attribute", "boilerplate", "mixed"],
        default="mixed",
        help="how captions are corrupted",
    )
    add_seed(p)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    from ecif.audit.demo import DemoArgs, run_demo

    run_demo(
        DemoArgs(
            output=args.output,
            n_train=args.n,
            noise=args.noise,
            noise_kind=args.noise_kind,
            seed=args.seed,
        ),
        progress=show_progress(args),
    )
    print(f"open it with: ecif app {args.output}")
    return 0
