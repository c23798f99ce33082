"""`ecif clean --retrain-model`: the options, and the downstream report (no verb of its own)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ecif.cli.common import positive_int
from ecif.cli.options import add_field


def add_retrain_arguments(p: argparse.ArgumentParser) -> None:
    from ecif.audit.retrain import RetrainConfig

    g = p.add_argument_group(
        "retraining (downstream metrics)",
        "Retrain a small open_clip model on each kept set (all pairs, and after each drop) and "
        "report zero-shot accuracy and recall@1/5 on the validation pairs. The images are "
        "read back from the input shards named in the embeddings' manifest.json.",
    )
    g.add_argument(
        "--retrain-model",
        nargs="?",
        const="ecif-tiny",
        default=None,
        metavar="MODEL",
        help="retrain this model: ecif-tiny (the cached tiny CLIP, default when the flag has no "
        "value), local-dir:PATH or a model folder, or 'audit' (the model the embeddings were "
        "made with, when it is a local-dir:/ecif-tiny model); a CPU run suits small models only",
    )
    g.add_argument(
        "--retrain-regime",
        choices=["finetune", "scratch", "both"],
        default="finetune",
        help="fine-tune the model's weights, train its architecture from scratch, or both",
    )
    add_field(g, RetrainConfig, "steps", "--retrain-steps", dest="retrain_steps", type=positive_int)
    add_field(
        g,
        RetrainConfig,
        "batch_size",
        "--retrain-batch-size",
        dest="retrain_batch_size",
        type=positive_int,
    )
    add_field(g, RetrainConfig, "lr", "--retrain-lr", dest="retrain_lr", type=float)
    add_field(g, RetrainConfig, "device", "--retrain-device", dest="retrain_device")
    g.add_argument(
        "--classes",
        help="text file, one class name per line, for zero-shot classification; a validation "
        "pair's class is the name its caption contains (pairs naming none are skipped). "
        "Without it, the classes are the distinct validation captions",
    )
    g.add_argument(
        "--prompt",
        nargs="+",
        default=["a photo of a {}."],
        metavar="TEMPLATE",
        help="zero-shot prompt template ({} = class); several are ensembled (mean embedding)",
    )


def run_retrain(
    args: argparse.Namespace, table: pd.DataFrame, info: dict, count: int | None
) -> int:
    """Print the retraining comparison (``table`` in training order, with an ``id`` column);
    returns the exit status: 0 (bad inputs raise UsageError: one line, exit 2)."""
    from ecif.cli.errors import UsageError

    try:
        _run(args, table, info, count)
    except UsageError:
        raise
    except (ValueError, OSError) as e:  # unreadable shards or classes file, a bad model choice
        raise UsageError(str(e)) from None
    return 0


def _run(args: argparse.Namespace, table: pd.DataFrame, info: dict, count: int | None) -> None:
    from ecif.audit.retrain import RetrainConfig, compare_retraining

    model = args.retrain_model
    if model == "audit":
        model = _audit_model(info)
    classes = None
    if args.classes:
        lines = Path(args.classes).read_text().splitlines()
        classes = [c.strip() for c in lines if c.strip()]
        if not classes:
            raise ValueError(f"{args.classes}: no class names")
    regimes = ("finetune", "scratch") if args.retrain_regime == "both" else (args.retrain_regime,)
    cfg = RetrainConfig(
        steps=args.retrain_steps,
        batch_size=args.retrain_batch_size,
        lr=args.retrain_lr,
        seed=args.seed,
        device=args.retrain_device,
    )
    res = compare_retraining(
        table,
        info["embeddings"],
        args.val,
        count,
        seed=args.seed,
        model=model,
        regimes=regimes,
        config=cfg,
        classes=classes,
        template=args.prompt[0] if len(args.prompt) == 1 else args.prompt,
    )
    lrs = ", ".join(f"{r} lr {cfg.lr_for(r):g}" for r in regimes)
    print(
        f"\nretrained {model} on each kept set ({cfg.steps} steps, batch {cfg.batch_size}, "
        f"{lrs}, seed {cfg.seed}); measured on the {args.val} pairs:"
    )
    print(res.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _audit_model(info: dict) -> str:
    model = str(info.get("model") or "")
    if model == "ecif-tiny" or model.startswith("local-dir:"):
        return model
    raise ValueError(
        f"--retrain-model audit: the audit's model {model!r} is not a local-dir: or ecif-tiny "
        "model; pass --retrain-model local-dir:PATH (or ecif-tiny)"
    )
