"""The audit's signals in a model mode: influence and pair losses through the encoders'
projections (``ecif.engine.model_mode``), read from the sets' feature caches.

The scale and pull an audit uses there: "auto" scale is the temperature that calibrates the
pretrained similarity on the validation pairs, without the head's factor 1/2 (on digits the
projection mode's AP was 0.665 at that temperature, 0.531 at half of it and 0.429 at the
model's own 21.8, one seed; benchmarks/bench_model_mode.py). Without a validation set, the
projection mode scores self-influence (``no_val_rule``) at the geometric mean of the
calibrations on all training pairs and on the head's trimmed share; the projection mode's
cross-fit uses the all-pairs one, since each half, fit on half the pairs, fits its noisy
ones at the sharper scale (benchmarks/README.md, "Self-influence at the geometric-mean scale");
lora's cross-fit (its default there) the trimmed one, as its low-rank part fits far less.
"auto" pull is the mode's own
(``model_mode.pull_of``: 0.1 projection, 1.0 lora); "model" scale is the cache's recorded one.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ecif.audit.audit_args import VAL_MODES
from ecif.audit.checks import AuditInputError
from ecif.audit.selection import cross_fit_scale
from ecif.data.duplicates import image_halves
from ecif.data.features import StackedRows
from ecif.engine.encoder_influence import ModelInverse
from ecif.engine.model_mode import ModelArgs, fit_model, model_pair_losses, score_model
from ecif.engine.model_probes import DEFAULT_PROBES as PROBES
from ecif.engine.model_probes import PROBE_SOLVE_TOL, probe_estimate


def model_args(auditor: Any) -> ModelArgs:
    """The ModelArgs an audit's options and head choice give."""
    a = auditor.args
    choice = auditor.choose()
    if a.logit_scale == "auto":
        untrusted = auditor.val is None
        scale = untrusted_scale(auditor, choice) if untrusted else choice.calibrated_scale
    elif a.logit_scale in ("model", None):
        scale = None
    else:
        scale = float(a.logit_scale)
    lam = None if a.lam in ("auto", "model", None) else float(a.lam)  # None: the mode's own
    return ModelArgs(
        params=a.params,
        lora_rank=a.lora_rank,
        lora_blocks=a.lora_blocks,
        lam=lam,
        logit_scale=scale,
        batch_size=a.batch_size,
        seed=a.seed,
        dtype=a.dtype,
        device=a.device,
    )


def no_val_rule(auditor: Any) -> str:
    """How a model mode scores without a validation set: ``no_val``, where "auto" is
    self-influence in the projection mode (AP above the cross-fit on 31 of 44 set-seeds over
    14 sets, at x2-x11 the seconds) and cross-fitting in lora (self-influence costs it more)."""
    a = auditor.args
    if a.no_val not in VAL_MODES:
        raise ValueError(f"no_val must be one of {VAL_MODES}; got {a.no_val!r}")
    if a.no_val == "auto":
        return "self" if a.params == "projection" else "crossfit"
    return a.no_val


def untrusted_scale(auditor: Any, choice: Any) -> float:
    """The "auto" scale without a validation set. Self-influence: the geometric mean of the
    all-pairs calibration (pulled down by the noise: 3.7 on digits, whose clean pairs give
    4.6) and the trimmed one (5.7). The projection mode's cross-fit: the all-pairs one; each
    half, fit on half the pairs, fits its noisy ones at a sharper scale (shapes at 10% noise:
    0.82 -> 0.76 at the geometric mean; at 20%, 0.87 -> 0.79 at the trimmed one). lora's
    cross-fit: the trimmed one (the reading: a rank-4 part fits its noisy pairs far less than
    the projections do); on six sets it ranked above the all-pairs one on 15 of 18 set-seeds
    (digits +0.04 to +0.05, shapes +0.01; shapes at 10% noise -0.02)."""
    if no_val_rule(auditor) == "self":
        return float(np.sqrt(choice.all_pairs_scale * choice.calibrated_scale))
    if cross_fit_scale(auditor.args.params) == "trimmed":
        return choice.calibrated_scale
    return choice.all_pairs_scale


def model_signals(auditor: Any, progress: bool) -> pd.DataFrame:
    """id, influence (and its parts) and pair_loss for the training set, in its order."""
    a = auditor.args
    if auditor.val is None:
        if no_val_rule(auditor) == "self":
            return model_self_influence(auditor, progress)
        return model_crossfit(auditor, progress)
    train, val = auditor.train_features, auditor.val_features
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
    from ecif.data.features import load_features

    try:
        return {
            "train_features": load_features(embeddings),
            "val_features": None if val is None else load_features(val.source),
        }
    except (OSError, ValueError) as err:
        raise AuditInputError(str(err).splitlines()[0]) from err


def check_model_inputs(auditor: Any) -> None:
    """Raise AuditInputError, before any fit, unless the feature caches fit the mode: the
    training cache's kind is ``params``, each cache has its embeddings' rows, and the
    validation cache holds the same trainable part (kind, cut, tensors) as the training one:
    the mode runs both sets' features through that part, so features cut elsewhere or taken
    from another model give numbers without meaning, or a shape error deep in the fit."""
    a, train, val = auditor.args, auditor.train_features, auditor.val_features
    hint = f"embed it with --cache-features {a.params}"
    if train is None:
        raise AuditInputError(f"params={a.params!r} needs the training set's feature cache: {hint}")
    if train.kind != a.params:
        raise AuditInputError(
            f"params={a.params!r}, but the training features are a {train.kind!r} cache: embed "
            f"with --cache-features {a.params}, or audit with --params {train.kind}"
        )
    if auditor.val is not None and val is None:
        raise AuditInputError(f"params={a.params!r} needs the validation set's features: {hint}")
    for what, feats, emb in (("training", train, auditor.train), ("validation", val, auditor.val)):
        if feats is not None and emb is not None and len(feats.image) != len(emb):
            raise AuditInputError(
                f"the {what} feature cache has {len(feats.image)} rows but its embeddings "
                f"{len(emb)}: use the folder the features were cached with"
            )
    if val is not None and not same_part(train.init, val.init):
        raise AuditInputError(
            f"the validation features ({val.kind!r}, {_cut(val.init)}, {val.init.get('model')}) "
            f"were not cached with the training features' trainable part ({train.kind!r}, "
            f"{_cut(train.init)}, {train.init.get('model')}): embed both with the same model "
            f"and --cache-features {a.params} (and --cache-blocks)"
        )
    blocks = (train.init.get("config") or {}).get("blocks")
    if a.params == "lora" and blocks is not None and (a.lora_blocks or 1) > blocks:
        raise AuditInputError(
            f"lora_blocks={a.lora_blocks}: the feature cache was cut {blocks} block(s) from the "
            f"end; use at most {blocks}, or embed with --cache-blocks {a.lora_blocks}"
        )


def _cut(init: dict) -> str:
    blocks = (init.get("config") or {}).get("blocks")
    return "the projections" if blocks is None else f"{blocks} block(s) from the end"


def same_part(a: dict, b: dict) -> bool:
    """Whether two caches' ``trainable_init`` records are one trainable part: the same kind,
    cut and pretrained tensors."""
    if a.get("kind") != b.get("kind") or a.get("config") != b.get("config"):
        return False
    ta, tb = a.get("tensors") or {}, b.get("tensors") or {}
    if ta.keys() != tb.keys():
        return False
    return all(
        tuple(ta[k].shape) == tuple(tb[k].shape)
        and torch.equal(torch.as_tensor(ta[k]), torch.as_tensor(tb[k]))
        for k in ta
    )


def feature_rows(feats: Any, rows: np.ndarray) -> SimpleNamespace:
    """The rows ``rows`` of a FeatureSet (image, text, ids, init; batches drawn anew)."""
    return SimpleNamespace(  # read on demand: a half of a large cache is not copied
        image=StackedRows([(feats.image, rows)]),
        text=StackedRows([(feats.text, rows)]),
        ids=np.asarray(feats.ids)[rows],
        init=feats.init,
    )


def model_self_influence(auditor: Any, progress: bool) -> pd.DataFrame:
    """Without a validation set, ``no_val="self"``: grad R_n^T H^-1 grad R_n through the
    trainable part, estimated from ``PROBES`` random probes (``ecif.engine.model_probes``)."""
    a = auditor.args
    train = auditor.train_features
    model = fit_model(train, train.init, model_args(auditor), progress=progress)
    auditor.heads = [model]
    # the probes' block solve is the longest step here: it grows with the scale (sharper, more
    # CG steps); the bar counts its iterations, then the probes' scoring passes
    inverse = ModelInverse(model, train.image, train.text, tol=PROBE_SOLVE_TOL)
    with tqdm(desc="self-influence: solve", unit="it", disable=not progress) as bar:
        shown = ProbeProgress(bar, PROBE_SOLVE_TOL, PROBES)
        est = probe_estimate(
            model,
            train,
            probes=PROBES,
            inverse=inverse,
            neg=a.neg,
            seed=a.seed,
            progress=shown.probe,
            solve_progress=shown.solve,
        )
    auditor.val_source = (
        f"self-influence, params={a.params} ({PROBES} random probes; no validation set)"
    )
    return self_influence_table(
        auditor.train.ids, est.self_influence(), model_pair_losses(model, train)
    )


class ProbeProgress:
    """One bar for the probe estimate: the block solve's iterations (with its largest
    residual against the tolerance), then, restarted, the K scoring passes."""

    def __init__(self, bar: tqdm, tol: float, probes: int):
        self.bar, self.tol, self.probes, self.solving = bar, tol, probes, True

    def solve(self, rel: float) -> None:
        self.bar.set_postfix_str(f"residual {rel:.1e} (to {self.tol:g})", refresh=False)
        self.bar.update()

    def probe(self, n: int) -> None:
        if self.solving:  # the solve is done: the same bar counts the scoring passes
            self.solving = False
            self.bar.set_description_str("self-influence: scoring passes", refresh=False)
            self.bar.set_postfix_str("", refresh=False)
            self.bar.unit = "probe"
            self.bar.reset(total=self.probes)
        self.bar.update(n)


def self_influence_table(ids, self_influence, pair_loss) -> pd.DataFrame:
    """The signals of an audit without a validation set scored by self-influence (head or
    model mode): no influence on a validation loss, so its columns are NaN."""
    nan = np.full(len(ids), np.nan)
    return pd.DataFrame(
        {
            "id": ids,
            "influence": nan,
            "influence_pos": nan,
            "influence_neg": nan,
            "self_influence": self_influence,
            "pair_loss": pair_loss,
        }
    )


def model_crossfit(auditor: Any, progress: bool) -> pd.DataFrame:
    """Without a validation set, as the head mode's cross-fitting: each half of the training
    set is fit on its own and scored against the other half's best-fitting pairs (lowest
    pair loss under that half's model) as a proxy validation set."""
    a = auditor.args
    train = auditor.train_features
    if len(train.image) < 8:
        raise AuditInputError(
            f"without a validation set, a model-mode audit cross-fits halves and needs at least "
            f"8 pairs; got {len(train.image)}"
        )
    folds = image_halves(auditor.train.image, a.seed)
    subs = [feature_rows(train, rows) for rows in folds]
    margs = model_args(auditor)
    models = [fit_model(sub, train.init, margs, progress=progress) for sub in subs]
    losses = [model_pair_losses(m, sub) for m, sub in zip(models, subs)]
    proxies = [
        feature_rows(sub, np.nonzero(loss <= np.quantile(loss, a.proxy_fraction))[0])
        for sub, loss in zip(subs, losses)
    ]
    parts = []
    for k in (0, 1):
        df = score_model(models[k], subs[k], proxies[1 - k], neg=a.neg, progress=progress)
        df["pair_loss"] = losses[k]
        df.index = folds[k]
        parts.append(df)
    auditor.heads = models
    auditor.val_source = (
        f"cross-fit, params={a.params}: each half scored against the other half's "
        f"best-fitting {a.proxy_fraction:.0%} (no validation set)"
    )
    out = pd.concat(parts).sort_index()
    out["id"] = auditor.train.ids
    return out


def twin_features(
    auditor: Any,
    rows: np.ndarray,
    image_rows: np.ndarray | None,
    text_rows: np.ndarray | None,
    held: np.ndarray | None,
) -> dict:
    """The feature caches of a model mode's twin audit (``ecif.audit.probes``; none in the
    head mode): the training rows ``rows``, then the probes (``image_rows``/``text_rows``,
    positions within ``rows``), then the validation rows ``held`` as clean rows; its
    validation features are the rest. The twin has no shard groups, as in the head mode."""
    if auditor.args.params == "head":
        return {}
    train, val = auditor.train_features, auditor.val_features
    own = np.r_[rows, rows[image_rows]], np.r_[rows, rows[text_rows]]
    image, text = [(train.image, own[0])], [(train.text, own[1])]
    if held is not None:
        image.append((val.image, held))
        text.append((val.text, held))
        val = feature_rows(val, np.setdiff1d(np.arange(len(val.image)), held))
    image, text = StackedRows(image), StackedRows(text)
    twin = SimpleNamespace(image=image, text=text, ids=np.arange(len(image)), init=train.init)
    return {"train_features": twin, "val_features": val}
