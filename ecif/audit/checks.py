"""Checks an audit runs before any fit: what would otherwise fail (or mislead) after it.

A bad threshold, a validation set of another width or from another embedding model, or a
training folder with too few usable rows are reported at once, before a minute of fitting
and before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from ecif.audit.audit_args import WEIGHT_MODES
from ecif.audit.combine import CONSENSUS, SIGNALS, VALIDATED_SIGNALS
from ecif.audit.thresholds import flag_count
from ecif.data.embedding_set import EmbeddingSet
from ecif.data.layout import model_label

log = logging.getLogger(__name__)
MISMATCH_ALLOWED = "going on because the mismatch was allowed"  # logged when found


class AuditInputError(ValueError):
    """Inputs or options an audit cannot run with; found before the fit."""


def _whole(value: Any, name: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
        raise AuditInputError(f"{name} must be a whole number >= {least}; got {value!r}")


def _scale_or_pull(value: Any, name: str, words: tuple[str, ...]) -> None:
    if value is None or (isinstance(value, str) and value in words):
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number > 0):
        raise AuditInputError(
            f"{name} must be {' or '.join(repr(w) for w in words)} or a finite positive "
            f"number; got {value!r}"
        )


def check_options(args: Any) -> None:
    """Raise AuditInputError for an ``AuditArgs`` value no audit can run with, before any
    data is read: a name outside its choices, a seed or batch size that is not a whole number
    (a batch of 1 pair has no negatives: every influence would be 0), a scale or pull that is
    not a finite positive number (an infinite one overflows the fit)."""
    for f in dataclasses.fields(args):
        choices = f.metadata.get("choices")
        value = getattr(args, f.name)
        if f.name == "device" and str(value).startswith("cuda:"):
            continue  # one GPU of several (ecif.device.resolve_device checks it)
        if choices and value not in choices:
            raise AuditInputError(f"{f.name} must be one of {choices}; got {value!r}")
    _whole(args.seed, "seed", 0)
    _whole(args.batch_size, "batch_size", 2)
    _whole(args.lora_rank, "lora_rank", 1)
    if args.lora_blocks is not None:
        _whole(args.lora_blocks, "lora_blocks", 1)
    if args.warmup_epochs is not None:
        _whole(args.warmup_epochs, "warmup_epochs", 0)
    _scale_or_pull(args.logit_scale, "logit_scale", ("auto", "model"))
    _scale_or_pull(args.lam, "lam", ("auto", "model"))
    if not (isinstance(args.probes, Real) and 0 <= args.probes < 1):
        raise AuditInputError(f"probes must be a fraction in [0, 1); got {args.probes!r}")
    if not (isinstance(args.proxy_fraction, Real) and 0 < args.proxy_fraction <= 1):
        raise AuditInputError(
            f"proxy_fraction must be a fraction in (0, 1]; got {args.proxy_fraction!r}"
        )
    check_threshold(args.threshold)


def check_joint_space(train: Any) -> None:
    """Raise AuditInputError unless image and text rows share a width: an audit reads their
    cosine (``clip_score``, the scale's calibration) as CLIP does, in one joint space. (The
    engine alone, ``ecif.fit``, takes a head between two widths.)"""
    if train.d_image != train.d_text:
        raise AuditInputError(
            f"image embeddings are {train.d_image}-d and text embeddings {train.d_text}-d: an "
            "audit compares them by cosine, as CLIP does, so both must be one model's outputs "
            "in its joint space (its image and text projections)"
        )


def check_threshold(threshold: Any) -> None:
    """Raise AuditInputError unless ``threshold`` is 'auto', a fraction in (0, 1) or a count."""
    try:
        flag_count(np.zeros(0), threshold)
    except (ValueError, TypeError) as e:
        raise AuditInputError(f"threshold: {e}") from None


def check_weights(weights: str, has_val: bool, params: str = "head") -> None:
    """A signal named in ``weights`` must be one this audit computes: ``trusted_loss`` exists
    only with a validation set (in every mode), ``knn_disagreement`` with one or in the head
    mode."""
    if weights not in WEIGHT_MODES:
        raise AuditInputError(f"weights must be one of {WEIGHT_MODES}; got {weights!r}")
    computed_here = weights == CONSENSUS and params == "head"  # with or without validation
    if weights in VALIDATED_SIGNALS and not has_val and not computed_here:
        where = "a validation set or params=head" if weights == CONSENSUS else "a validation set"
        raise AuditInputError(
            f"weights={weights!r}: that signal exists only with {where}; "
            f"use auto, equal or one of {SIGNALS}"
        )


def check_training(train: EmbeddingSet, folder: Any, failed: int = 0) -> None:
    """At least 2 usable pairs."""
    if len(train) < 2:
        why = f" ({failed} rows failed to embed; see their error_message)" if failed else ""
        raise AuditInputError(
            f"{folder}: {len(train)} usable pair(s){why}; an audit needs at least 2"
        )


def check_validation(
    train: EmbeddingSet,
    val: EmbeddingSet,
    train_model: dict | None,
    *,
    allow_model_mismatch: bool = False,
) -> str | None:
    """Same widths and the same embedding model as the training set.

    The model identity is the manifests' ``model`` and ``pretrained``; when either folder
    does not record one, nothing can be compared. Another model is refused unless
    ``allow_model_mismatch``, which logs a warning and returns it (to be recorded).
    """
    if len(val) < 2:
        raise AuditInputError(
            f"{val.source or 'the validation set'}: {len(val)} usable pair(s); a validation set "
            "needs at least 2 (a contrastive loss compares each pair with the others)"
        )
    if (val.d_image, val.d_text) != (train.d_image, train.d_text):
        raise AuditInputError(
            f"validation widths (image {val.d_image}, text {val.d_text}) differ from the "
            f"training widths (image {train.d_image}, text {train.d_text}): embed both with "
            "the same model"
        )
    if not train_model or not val.model:
        return None
    same = (train_model.get("model"), train_model.get("pretrained") or None) == (
        val.model.get("model"),
        val.model.get("pretrained") or None,
    )
    if same:
        return None
    text = (
        f"the validation set was embedded with {model_label(val.model)}, the training set "
        f"with {model_label(train_model)}"
    )
    if not allow_model_mismatch:
        raise AuditInputError(
            f"{text}: influence across two embedding spaces means nothing; re-embed one of "
            "them (or pass --allow-model-mismatch / allow_model_mismatch=True if the two "
            "names are the same model)"
        )
    warning = f"{text}; {MISMATCH_ALLOWED}"
    log.warning(warning)
    return warning


MORE_TRUSTED = "outnumbers the training set"  # in small_train_note's text: what readers match
# from this many validation pairs per training pair: measured better at 1.5, 2 and 5; even at 1
MORE_TRUSTED_RATIO = 1.5


def small_train_note(n_train: int, val: EmbeddingSet | None, weights: str) -> str | None:
    """Advice when the trusted pairs outnumber the training pairs (by ``MORE_TRUSTED_RATIO``
    or more): the head fit on them alone then ranks better than the default's mixture, which
    cannot see that the training head has fit its own noisy pairs (benchmarks/README.md,
    "Small sets": 200 training pairs,
    +0.017 to +0.021 AP on every seed against 300 and 1,000 validation pairs, +0.009 at
    250 / 500; 500 / 500 even)."""
    if val is None or weights != "auto" or len(val) < MORE_TRUSTED_RATIO * n_train:
        return None
    return (
        f"the validation set ({len(val)} pairs) {MORE_TRUSTED} ({n_train}) by "
        f"{len(val) / max(n_train, 1):.1f}x: "
        "a head fit on the validation pairs alone ranked misaligned pairs better than the "
        "default combination in that case; consider weights='trusted_loss' "
        "(`--weights trusted_loss`)"
    )
