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


SOLVERS = ("auto", "exact", "cg", "ekfac")


def solver_help(auto: str) -> str:
    """One description of the inverse-Hessian solvers for every verb; ``auto`` says what
    'auto' picks in that verb."""
    return (
        "inverse-Hessian solver: 'exact' (dense Hessian, small heads), 'cg' (exact "
        "Hessian-vector products, EK-FAC preconditioned, to relative residual 1e-4: scores to "
        "~1e-3 of the largest), 'ekfac' (no iterations: fast but approximate, for screening), "
        f"'auto' ({auto}) (default: %(default)s)"
    )


def threshold_arg(text: str) -> str:
    """--threshold: 'auto', a fraction in (0, 1) or a count >= 0, checked at parse time."""
    from ecif.audit.checks import AuditInputError, check_threshold

    try:
        check_threshold(text)
    except AuditInputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("threshold: ")) from None
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


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
        if not value > 0:
            words = "', '".join(("auto", *extra))
            raise argparse.ArgumentTypeError(
                f"expected '{words}' or a positive number, got {text!r}"
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


def add_audit_options(p: argparse.ArgumentParser) -> None:
    """The options that decide an audit's numbers (recorded in its outputs)."""
    g = p.add_argument_group("audit options")
    g.add_argument(
        "--batch-size", type=int, default=256, help="contrastive batch size of the head's partition"
    )
    g.add_argument(
        "--lam",
        type=auto_or_positive("lam"),
        default="auto",
        metavar="auto|LAM",
        help="L2 pull of the head towards the pretrained model; auto: chosen by how well the "
        "scores rank planted probe pairs (see audit.json's head_choice)",
    )
    g.add_argument(
        "--logit-scale",
        type=auto_or_positive("logit_scale", extra=("model",)),
        default="auto",
        metavar="auto|model|T",
        help="logit scale t of the head; auto: searched around the temperature that calibrates "
        "the pretrained similarity on the validation pairs; model: the embedding model's own",
    )
    g.add_argument(
        "--weights",
        choices=["auto", "equal", "influence", "pair_loss", "clip_score"],
        default="auto",
        help="how misalign_score combines the standardised signals: auto (chosen on the probes), "
        "equal weights, or one signal alone",
    )
    g.add_argument(
        "--neg", choices=["exact", "first_order"], default="exact", help="form of the negative term"
    )
    g.add_argument(
        "--solver",
        choices=SOLVERS,
        default="auto",
        help=solver_help("exact when that costs less than cg, else cg"),
    )
    g.add_argument(
        "--threshold",
        default="auto",
        type=threshold_arg,
        help="how many to flag: 'auto' (estimated noise rate), a fraction like 0.1, or a count like 500",
    )
    g.add_argument(
        "--no-val",
        choices=["auto", "self", "crossfit"],
        default="auto",
        help="without --val: self-influence or cross-fitting (auto: self for small heads)",
    )
    g.add_argument(
        "--warmup-epochs",
        type=warmup_epochs_arg,
        default="auto",  # argparse runs string defaults through type: None
        metavar="auto|N",
        help="epochs of streamed minibatch steps before the full-batch fit, which still runs to "
        "its tolerance (same head, fewer passes over the embeddings); 0 turns it off; auto: 2 "
        "from 50k pairs when the head is fit by L-BFGS",
    )
    add_seed(p)
    add_device(p)


def audit_args_from(args: argparse.Namespace):
    from ecif.audit import AuditArgs

    return AuditArgs(
        batch_size=args.batch_size,
        seed=args.seed,
        lam=args.lam,
        logit_scale=args.logit_scale,
        weights=args.weights,
        neg=args.neg,
        method=args.solver,
        threshold=args.threshold,  # parsed by thresholds.flag_count
        no_val=args.no_val,
        warmup_epochs=args.warmup_epochs,
        device=resolve_device(args.device),
    )
