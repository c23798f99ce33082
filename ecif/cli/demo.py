"""`ecif demo`: the whole pipeline on the embedded shapes data with the tiny CLIP."""

from __future__ import annotations

import argparse

from ecif.cli.common import add_quiet, fraction, non_negative_int, positive_int, show_progress
from ecif.cli.options import add_field

NAME = "demo"
HELP = "run the whole audit on the embedded demo data (no downloads)"
DESCRIPTION = """Make the shapes dataset with mixed caption noise (shuffled captions, near-miss
shapes, one wrong attribute, boilerplate text), embed it with the tiny CLIP (trained offline
once and cached), choose and fit the head, score, index, and write an audit folder that
`ecif app` opens. Prints AUROC and AP of misalign_score and of each signal alone against the
known corruptions."""


DEMO_FLAGS = ("output", "n_train", "noise", "noise_kind", "seed")  # the DemoArgs fields set here


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ecif.audit.demo import DemoArgs

    add_field(p, DemoArgs, "output", "--output", "-o")
    add_field(p, DemoArgs, "n_train", "--n", type=positive_int, metavar="N")
    add_field(p, DemoArgs, "noise", type=fraction)
    add_field(p, DemoArgs, "noise_kind")
    add_field(p, DemoArgs, "seed", type=non_negative_int)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    from ecif.audit.demo import DemoArgs, run_demo

    run_demo(
        DemoArgs(**{name: getattr(args, name) for name in DEMO_FLAGS}),
        progress=show_progress(args),
    )
    print(f"open it with: ecif app {args.output}")
    return 0
