"""Trust check on the user's own data: predicted vs actual loss change over real refits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

import ecif.api as api
from ecif.engine.head import Head
from ecif.progress import step


def verify(
    head: Head,
    train,
    val,
    k: int = 20,
    seed: int = 0,
    neg: str = "exact",
    scores: pd.DataFrame | None = None,
    progress: Callable[[int], None] | None = None,
    spinner: bool = False,
) -> tuple[float, pd.DataFrame]:
    """Refit after k sampled single removals (warm start, same partition) and compare.

    Returns (Spearman between predicted and actual validation-loss change, per-removal table).
    Half the sample comes from the most suspicious pairs and half at random, so the check
    covers the pairs a user will act on as well as typical ones. ``progress(i)`` after each
    refit; ``spinner``: a spinner line for the float64 refit and the scoring before them.
    """
    n = len(train)
    if k < 3 or k > n:
        raise ValueError(f"k must be in [3, {n}]; got {k}")
    kw = dict(
        batch_size=head.batch_size, seed=head.seed, lam=head.lam, logit_scale=head.logit_scale
    )
    if head.dtype != torch.float64:  # single removals move the loss by ~1/N: below float32 noise
        with step("refitting the head in float64", spinner):
            head = api.fit(train, init=head, dtype="float64", **kw)
        scores = None
    if scores is None:
        with step("scoring every pair", spinner):
            scores = api.score(head, train, val, neg=neg)
    infl = scores["influence"].to_numpy()
    rows = sampled_rows(infl, k, seed)
    base = head.loss(val)
    actual = []
    for i, r in enumerate(rows):
        refit = api.fit(train, exclude=[train.ids[r]], init=head, dtype="float64", **kw)
        actual.append(refit.loss(val) - base)
        if progress:
            progress(i + 1)
    return compared(np.asarray(train.ids), rows, infl, actual)


def sampled_rows(influence: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Half the k rows from the most harmful pairs (lowest influence), half at random, among
    the scored rows (NaN: a pair's collapsed copy, or a removed pair, is no removal to test)."""
    scored = np.flatnonzero(np.isfinite(influence))
    n = len(scored)
    if k < 3 or k > n:
        raise ValueError(f"k must be in [3, {n}]; got {k}")
    worst = scored[np.argsort(influence[scored], kind="stable")[: k // 2]]
    rest = np.setdiff1d(scored, worst)
    rng = np.random.default_rng(seed)
    return np.concatenate([worst, rng.choice(rest, k - len(worst), replace=False)])


def compared(ids: np.ndarray, rows: np.ndarray, influence: np.ndarray, actual) -> tuple:
    """(Spearman, table of id, predicted, actual) for the refit rows."""
    table = pd.DataFrame(
        {"id": ids[rows], "predicted": influence[rows], "actual": np.asarray(actual, float)}
    )
    return float(spearmanr(table["predicted"], table["actual"])[0]), table


def verify_model(
    model,
    train,
    val,
    k: int = 20,
    seed: int = 0,
    neg: str = "exact",
    progress: Callable[[int], None] | None = None,
    spinner: bool = False,
) -> tuple[float, pd.DataFrame]:
    """``verify`` in a model mode (an ``EncoderModel`` fit on ``train``'s feature cache):
    the trainable part refit in float64 after each of k single removals (warm start, same
    batches), against the influence on ``val``'s mean loss."""
    from ecif.engine.encoder_fit import fit_encoder
    from ecif.engine.encoder_model import mean_loss
    from ecif.engine.model_mode import score_model

    n = len(train.image)
    if model.partition.n != n:
        raise ValueError(f"the model was fit on {model.partition.n} pairs; the features have {n}")
    if k < 3 or k > n:
        raise ValueError(f"k must be in [3, {n}]; got {k}")
    with step("refitting the model in float64", spinner):
        model = fit_encoder(model.to(torch.float64), train.image, train.text)
    with step("scoring every pair", spinner):
        infl = score_model(model, train, val, neg=neg)["influence"].to_numpy(np.float64)
    rows = sampled_rows(infl, k, seed)
    base = mean_loss(model, val.image, val.text)
    actual = []
    for i, r in enumerate(rows):
        refit = fit_encoder(model, train.image, train.text, init=model, exclude_positions=[r])
        actual.append(mean_loss(refit, val.image, val.text) - base)
        if progress:
            progress(i + 1)
    ids = np.asarray(getattr(train, "ids", np.arange(n)))
    return compared(ids, rows, infl, actual)
