"""Flags shared by several verbs, so every verb spells them the same way."""

from __future__ import annotations

import argparse
import math
import sys

from ecif.cli.options import add_field
from ecif.device import resolve_device


def add_device(p: argparse.ArgumentParser) -> None:
    from ecif.api import FitArgs

    add_field(p, FitArgs, "device")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed for batch partition and sampling"
    )


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars unless --quiet or stderr is not a terminal."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def threshold_arg(text: str) -> str:
    """--threshold: 'auto', a fraction in (0, 1) or a count >= 0, checked at parse time."""
    from ecif.audit.checks import AuditInputError, check_threshold

    try:
        check_threshold(text)
    except AuditInputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("threshold: ")) from None
    return text


def bounded(cast, ok, expected: str):
    """An argparse type: ``cast(text)`` where ``ok`` holds it, else an error that says what
    was expected (``expected``)."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = cast.__name__
    return parse


non_negative_int = bounded(int, lambda v: v >= 0, "an integer >= 0")  # a seed, a worker count
positive_int = bounded(int, lambda v: v >= 1, "an integer >= 1")
fraction = bounded(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")  # NaN fails too


def add_val(p: argparse.ArgumentParser, required: bool = False, what: str = "") -> None:
    """--val and --allow-model-mismatch."""
    p.add_argument(
        "--val",
        required=required,
        help="embedding folder of trusted validation pairs, embedded with the training "
        "embeddings' model" + what,
    )
    p.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="go on (with a warning) when --val's manifest names another embedding model "
        "than the training embeddings'",
    )


def load_val(args: argparse.Namespace, train, train_folder: str | None):
    """``--val``, checked against the training set (widths, model) before any fit."""
    from ecif.audit.checks import check_validation
    from ecif.data.embedding_set import EmbeddingSet
    from ecif.data.layout import model_identity, read_manifest

    val = EmbeddingSet.load(args.val)
    model = model_identity(read_manifest(train_folder)) if train_folder else None
    check_validation(train, val, model, allow_model_mismatch=args.allow_model_mismatch)
    return val


def auto_or_positive(name: str, extra: tuple[str, ...] = ()):
    """An argparse type: 'auto' (and the ``extra`` words) or a positive number."""

    def parse(text: str):
        if text in ("auto", *extra):
            return text
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not (value > 0 and math.isfinite(value)):
            words = "', '".join(("auto", *extra))
            raise argparse.ArgumentTypeError(
                f"expected '{words}' or a finite positive number, got {text!r}"
            )
        return value

    parse.__name__ = name
    return parse


def warmup_epochs_arg(text: str) -> int | None:
    """--warmup-epochs: 'auto' (None) or an integer >= 0."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {text!r}")
    return value


# the flags of `ecif score` that set AuditArgs fields (the rest keep AuditArgs's defaults)
AUDIT_FLAGS = (
    "params",
    "lora_rank",
    "lora_blocks",
    "batch_size",
    "lam",
    "logit_scale",
    "weights",
    "probes",
    "neg",
    "solver",
    "threshold",
    "no_val",
    "duplicates",
    "warmup_epochs",
    "seed",
    "device",
)


def add_audit_options(p: argparse.ArgumentParser) -> None:
    """The options that decide an audit's numbers (recorded in its outputs): AuditArgs's."""
    from ecif.audit.audit_args import AuditArgs

    g = p.add_argument_group("audit options")
    add_field(g, AuditArgs, "params")
    add_field(g, AuditArgs, "lora_rank", type=int)
    add_field(g, AuditArgs, "lora_blocks", type=int)
    add_field(g, AuditArgs, "batch_size", type=int)
    add_field(g, AuditArgs, "lam", type=auto_or_positive("lam"), metavar="auto|LAM")
    add_field(
        g,
        AuditArgs,
        "logit_scale",
        type=auto_or_positive("logit_scale", extra=("model",)),
        metavar="auto|model|T",
    )
    add_field(g, AuditArgs, "weights")
    add_field(g, AuditArgs, "probes", type=fraction, metavar="FRACTION")
    add_field(g, AuditArgs, "neg")
    add_field(g, AuditArgs, "solver")
    add_field(g, AuditArgs, "threshold", type=threshold_arg)
    add_field(g, AuditArgs, "no_val")
    add_field(g, AuditArgs, "duplicates")
    add_field(
        g,
        AuditArgs,
        "warmup_epochs",
        type=warmup_epochs_arg,
        default="auto",  # argparse runs string defaults through type: None
        metavar="auto|N",
    )
    add_field(p, AuditArgs, "seed", type=int)
    add_field(p, AuditArgs, "device")


def audit_args_from(args: argparse.Namespace):
    """AuditArgs from `ecif score`'s flags, its device resolved (a missing GPU: an error now)."""
    from ecif.audit import AuditArgs

    values = {name: getattr(args, name) for name in AUDIT_FLAGS}
    return AuditArgs(**{**values, "device": resolve_device(args.device)})
