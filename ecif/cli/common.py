"""Flags shared by several verbs, so every verb spells them the same way."""

from __future__ import annotations

import argparse
import sys


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute"
    )


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed for batch partition and sampling")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars unless --quiet or stderr is not a terminal."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return name
