"""The ``ecif`` command line: one sub-command per verb, each in its own module.

A verb module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
(optionally ``INTERRUPTED``, what to print on Ctrl-C). Register it in ``VERB_MODULES`` below.

User errors (see ``ecif.cli.errors``) end as one ``error: ...`` line on stderr and exit 2;
Ctrl-C ends with one line and exit 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    from ecif._version import __version__
    from ecif.cli.errors import HelpFormatter, Parser

    parser = Parser(
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
            formatter_class=HelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _interrupted=getattr(mod, "INTERRUPTED", "interrupted"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from ecif.cli.errors import describe, is_user_error, setup_logging

    setup_logging()
    try:
        with ecif_warnings_as_lines():
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(args._interrupted, file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2


@contextmanager
def ecif_warnings_as_lines() -> Iterator[None]:
    """ecif's own warnings as one ``warning: ...`` line each, once per text, instead of
    Python's two-line form with a source line (a folder read three times warned three
    times). Other libraries' warnings are shown as Python shows them."""
    package = str(Path(__file__).resolve().parents[1])
    shown: set[str] = set()
    python_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not str(Path(filename).resolve()).startswith(package):
            # as if not replaced: a recording block (pytest's, catch_warnings) still records
            msg = warnings.WarningMessage(message, category, filename, lineno, file, line)
            return warnings._showwarnmsg_impl(msg)
        text = f"warning: {message}"
        if text not in shown:
            shown.add(text)
            print(text, file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = python_show


if __name__ == "__main__":
    sys.exit(main())
