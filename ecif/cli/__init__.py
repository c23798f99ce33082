"""The ``ecif`` command line: one sub-command per verb, each in its own module.

A verb module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Register it in ``VERB_MODULES`` below.
"""

from __future__ import annotations

import argparse
import importlib
import sys

VERB_MODULES: list[str] = [
    "embed",
    "score",
    "index",
    "trace",
    "clean",
    "export",
    "verify",
    "demo",
    "app",
]


def build_parser() -> argparse.ArgumentParser:
    from ecif import __version__

    parser = argparse.ArgumentParser(
        prog="ecif",
        description="Audit image-text (CLIP) datasets with ECIF influence scores.",
    )
    parser.add_argument("--version", action="version", version=f"ecif {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for mod_name in VERB_MODULES:
        mod = importlib.import_module(f"ecif.cli.{mod_name}")
        p = sub.add_parser(
            mod.NAME,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
