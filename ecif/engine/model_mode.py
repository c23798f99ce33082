"""The model modes' front: fit a trainable part of the encoders on cached features, score
every training pair, and the per-pair losses, with the same table columns as the head mode.

``features`` are objects with ``image`` and ``text`` arrays (rows = pairs; pooled features
before the projections for ``params="projection"``) and optionally ``ids`` and ``part`` (the
input shard, which keeps batches inside shards as in the head mode): ``ecif embed
--cache-features projection`` writes them and ``ecif.data.features.load_features`` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ecif.device import resolve_device
from ecif.engine.contrastive import batch_stats, pair_losses
from ecif.engine.encoder_fit import fit_encoder
from ecif.engine.encoder_influence import ModelInverse, score_pass
from ecif.engine.encoder_model import (
    CURVATURES,
    EncoderModel,
    batch_logits,
    loss_gradient,
    new_model,
)
from ecif.engine.encoder_part import ProjectionPart, TrainablePart
from ecif.engine.fit import FitArgs
from ecif.engine.lora_part import LoraPart
from ecif.options import borrow, option

PARAMS = ("head", "projection", "lora")
# the pull towards the pretrained projections. At 1e-2 (the head's) the tiny CLIP's fit on
# digits drove a caption's projected feature to norm 1e-5, where normalisation is singular,
# and never converged; at 0.1 it converged in 49 passes (benchmarks/README.md, model modes)
MODEL_LAM = 0.1
# the lora part's pull. Its adapters start at B = 0, a saddle of the loss in (A, B) wherever
# the loss's gradient in W outweighs the pull, and at 0.1 the fit did not reach a stationary
# point on digits (64 pairs, rank 4: gradient 0.15 after 100 Newton iterations at the
# calibrated scale). At 1.0 it converged in 25-337 passes on digits and shapes (64 and 192
# pairs, both temperatures; docs/math.md section 12)
LORA_LAM = 1.0
FLOOR_FRACTION = 0.05  # the normalisation floor, a share of the median pretrained norm


@dataclass
class ModelArgs:
    """How to fit a trainable part of the encoders (the model modes)."""

    params: str = option(
        "projection",
        help="trainable part: projection (both output projections) or lora (rank-r adapters "
        "in the last blocks of both towers, plus the projections; a lora feature cache)",
        choices=("projection", "lora"),
    )
    lora_rank: int = option(4, help="lora: the adapters' rank r")
    lora_blocks: int | None = option(
        None, help="lora: adapters in this many last blocks (None: all the cache's k)"
    )
    lam: float | None = option(
        None,
        help=f"L2 pull towards the pretrained weights (None: {MODEL_LAM:g} for projection, "
        f"{LORA_LAM:g} for lora)",
    )
    logit_scale: float | None = option(
        None, help="fixed temperature (None: the pretrained model's, from the feature cache)"
    )
    learn_scale: bool = borrow(FitArgs, "learn_scale")
    batch_size: int = borrow(FitArgs, "batch_size")
    seed: int = borrow(FitArgs, "seed")
    dtype: str = borrow(FitArgs, "dtype")
    device: str = borrow(FitArgs, "device")
    tol: float | None = borrow(FitArgs, "tol")
    max_iter: int = borrow(FitArgs, "max_iter")
    curvature: str = option(
        "exact",
        help="H in the solve: exact (falls back to gauss_newton where CG meets non-positive "
        "curvature) or gauss_newton",
        choices=CURVATURES,
    )
    damping: float = option(0.0, help="added to the pull in the solve (H + lam + damping)")


def pull_of(args: ModelArgs) -> float:
    """The pull a fit uses: ``args.lam``, else the mode's default."""
    if args.lam is not None:
        return float(args.lam)
    return LORA_LAM if args.params == "lora" else MODEL_LAM


def make_part(init: dict, args: ModelArgs, features=None) -> TrainablePart:
    """The trainable part from a feature cache's ``init`` record (pretrained tensors); with
    ``features`` (the training set's), the normalisation floors: ``FLOOR_FRACTION`` of each
    tower's median pretrained projected norm."""
    kind = init.get("kind", "projection")
    if args.params not in ("projection", "lora") or kind != args.params:
        raise ValueError(
            f"params={args.params!r} with a {kind!r} feature cache: embed with "
            f"--cache-features {args.params}"
        )
    t = {k: torch.as_tensor(v).double() for k, v in init["tensors"].items()}
    log_scale = np.log(args.logit_scale) if args.logit_scale else float(init["log_scale"])
    if kind == "lora":
        part = LoraPart(
            t,
            init["config"],
            log_scale,
            rank=args.lora_rank,
            blocks=args.lora_blocks,
            learn_scale=args.learn_scale,
        )
        if features is not None:
            part.floors = lora_floors(part, features)
        return part
    return ProjectionPart(
        t["image_proj"],
        t["text_proj"],
        log_scale,
        image_bias=t.get("image_bias"),
        text_bias=t.get("text_bias"),
        learn_scale=args.learn_scale,
        floors=(0.0, 0.0) if features is None else floors_of(t, features),
    )


def lora_floors(part: LoraPart, features, rows: int = 512) -> tuple[float, float]:
    """``floors_of`` for the lora part: its projected embeddings at theta_0 (the model's own,
    before normalisation) on up to ``rows`` rows."""
    dtype = torch.float64
    fi = torch.tensor(np.asarray(features.image[:rows]), dtype=dtype)
    ft = torch.tensor(np.asarray(features.text[:rows]), dtype=dtype)
    with torch.no_grad():
        u, v = part.project(part.initial(), fi, ft)
    return (
        FLOOR_FRACTION * float(u.norm(dim=-1).median()),
        FLOOR_FRACTION * float(v.norm(dim=-1).median()),
    )


def floors_of(tensors: dict, features, rows: int = 4096) -> tuple[float, float]:
    """FLOOR_FRACTION x the median norm of f P_0 (+ b_0) per tower, on up to ``rows`` rows."""
    out = []
    for side, key in (("image", "image"), ("text", "text")):
        f = torch.tensor(np.asarray(getattr(features, side)[:rows]), dtype=torch.float64)
        u = f @ tensors[f"{key}_proj"]
        if f"{key}_bias" in tensors:
            u = u + tensors[f"{key}_bias"]
        out.append(FLOOR_FRACTION * float(u.norm(dim=-1).median()))
    return out[0], out[1]


def fit_model(
    train,
    init: dict,
    args: ModelArgs | None = None,
    *,
    exclude_positions: Sequence[int] | None = None,
    warm: EncoderModel | None = None,
    progress: bool = False,
) -> EncoderModel:
    """Fit the trainable part on ``train``'s features to a stationary point. ``warm`` with
    ``exclude_positions``: the retraining check (same batches less those rows)."""
    args = args or ModelArgs()
    if args.curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}; got {args.curvature!r}")
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    groups = getattr(train, "part", None)
    model = new_model(
        make_part(init, args, train),
        len(train.image),
        lam=pull_of(args),
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=dtype,
        device=resolve_device(args.device),
        groups=None if groups is None else np.asarray(groups),
        curvature=args.curvature,
    )
    ex = None if exclude_positions is None else np.asarray(exclude_positions, dtype=np.int64)
    return fit_encoder(
        model,
        train.image,
        train.text,
        init=warm,
        exclude_positions=ex,
        max_iter=args.max_iter,
        tol=args.tol,
        progress=progress,
    )


def score_model(
    model: EncoderModel,
    train,
    val=None,
    *,
    query_grad: torch.Tensor | None = None,
    neg: str = "exact",
    damping: float = 0.0,
    progress: bool = False,
) -> pd.DataFrame:
    """Influence of every training pair on the validation loss through the trainable part:
    columns id, influence, influence_pos, influence_neg (as ``ecif.score``)."""
    from tqdm.auto import tqdm

    if query_grad is None:
        if val is None:
            raise ValueError("score_model needs a validation set (val=) or query_grad=")
        query_grad = loss_gradient(model, val.image, val.text)
    inv = ModelInverse(model, train.image, train.text, damping=damping)
    w = inv.solve(query_grad)
    bar = tqdm(total=len(train.image), desc="scoring", unit="pair", disable=not progress)
    d_pos, d_neg = score_pass(model, train.image, train.text, w, neg=neg, progress=bar.update)
    bar.close()
    ids = getattr(train, "ids", None)
    df = pd.DataFrame(
        {
            "id": np.arange(len(d_pos)) if ids is None else np.asarray(ids),
            "influence": ((d_pos + d_neg) / model.n_norm).astype(np.float32),
            "influence_pos": (d_pos / model.n_norm).astype(np.float32),
            "influence_neg": (d_neg / model.n_norm).astype(np.float32),
        }
    )
    df.attrs.update(solver=dict(inv.info), neg=neg, params=model.part.kind)
    return df


def model_pair_losses(model: EncoderModel, data: Any) -> np.ndarray:
    """Each pair's symmetric InfoNCE inside its batch of the model's partition (NaN if removed)."""
    out = np.full(model.partition.n, np.nan)
    with torch.no_grad():
        for ch in model.chunks(data.image, data.text):
            losses = pair_losses(batch_stats(batch_logits(model.part, model.theta, ch), ch.mask))
            m = ch.mask.cpu().numpy()
            out[ch.rows[m]] = losses.cpu().numpy()[m]
    return out
