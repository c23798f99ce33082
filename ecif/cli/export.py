"""``ecif export``: the pairs an audit keeps, as a DataComp subset file or an id list."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "write the kept pairs as a DataComp subset file (.npy) or an id list (.csv/.parquet)"
DESCRIPTION = """Keep the least suspicious fraction of the scored pairs (--keep FRACTION) or every
scored pair that is not flagged (--drop-flagged), and write them: --format datacomp is a
DataComp subset file (a sorted numpy array of dtype ("u8","u8") from the 32-hex uids, the
input of DataComp's resharder.py -s); --format ids is one id column (CSV, or parquet by
suffix). Rows that failed to embed are never kept."""


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audit", help="audit folder from `ecif score` or `ecif demo`")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--keep", type=fraction, metavar="FRACTION", help="keep this least suspicious fraction"
    )
    g.add_argument(
        "--drop-flagged", action="store_true", help="keep every scored pair that is not flagged"
    )
    p.add_argument(
        "--format",
        choices=["datacomp", "ids"],
        default="datacomp",
        help="datacomp: a DataComp subset file of uids; ids: a list of the kept ids",
    )
    p.add_argument(
        "--output", "-o", required=True, help="output file: .npy (datacomp); .csv or .parquet"
    )


def run(args: argparse.Namespace) -> int:
    from ecif.audit.export import export_audit  # its ExportError is a one-line error (cli/errors)

    res = export_audit(
        args.audit, args.output, keep=args.keep, drop_flagged=args.drop_flagged, fmt=args.format
    )
    print(res.summary())
    return 0
