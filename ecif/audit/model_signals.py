"""The audit's signals in a model mode: influence and pair losses through the encoders'
projections (``ecif.engine.model_mode``), read from the sets' feature caches.

The scale and pull an audit uses there: "auto" scale is the temperature that calibrates the
pretrained similarity on the validation pairs (the head's rule without its factor 1/2: on
digits the projection mode's AP was 0.665 at that temperature, 0.531 at half of it and 0.429
at the model's own 21.8, one seed; benchmarks/bench_model_mode.py), "auto" pull is
``MODEL_LAM``; "model" scale is the cache's recorded one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ecif.audit.checks import AuditInputError
from ecif.engine.model_mode import MODEL_LAM, ModelArgs, fit_model, model_pair_losses, score_model


def model_args(auditor: Any) -> ModelArgs:
    """The ModelArgs an audit's options and head choice give."""
    a = auditor.args
    choice = auditor.choose()
    if a.logit_scale == "auto":
        scale = choice.calibrated_scale
    elif a.logit_scale in ("model", None):
        scale = None
    else:
        scale = float(a.logit_scale)
    lam = MODEL_LAM if a.lam == "auto" else float(a.lam)
    return ModelArgs(
        params=a.params,
        lam=lam,
        logit_scale=scale,
        batch_size=a.batch_size,
        seed=a.seed,
        dtype=a.dtype,
        device=a.device,
    )


def model_signals(auditor: Any, progress: bool) -> pd.DataFrame:
    """id, influence (and its parts) and pair_loss for the training set, in its order."""
    a = auditor.args
    if auditor.val is None:
        raise ValueError(
            f"params={a.params!r} needs a validation set (--val): self-influence and "
            "cross-fitting are built for the head mode only"
        )
    train, val = auditor.train_features, auditor.val_features
    if train is None or val is None:
        raise ValueError(
            f"params={a.params!r} needs the feature caches of both sets: embed them with "
            f"--cache-features {a.params}"
        )
    for what, feats, emb in (("training", train, auditor.train), ("validation", val, auditor.val)):
        if len(feats.image) != len(emb):
            raise ValueError(
                f"the {what} feature cache has {len(feats.image)} rows but its embeddings "
                f"{len(emb)}: use the folder the features were cached with"
            )
    model = fit_model(train, train.init, model_args(auditor), progress=progress)
    auditor.heads = [model]
    auditor.val_source = f"validation set ({len(val.image)} pairs), params={a.params}"
    df = score_model(model, train, val, neg=a.neg, progress=progress)
    df["id"] = auditor.train.ids
    df["pair_loss"] = model_pair_losses(model, train)
    return df


def model_inputs(args: Any, embeddings: Path, val: Any) -> dict:
    """The feature caches a model-mode audit reads (none in the head mode); checked before
    any fit, so a missing cache or validation set fails at once."""
    if args.params == "head":
        return {}
    if val is None:
        raise AuditInputError(f"--params {args.params} needs a validation set (--val)")
    from ecif.data.features import load_features

    try:
        return {
            "train_features": load_features(embeddings),
            "val_features": load_features(val.source),
        }
    except (OSError, ValueError) as err:
        raise AuditInputError(str(err).splitlines()[0]) from err
