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
    rng = np.random.default_rng(seed)
    worst = np.argsort(infl, kind="stable")[: k // 2]
    rest = np.setdiff1d(np.arange(n), worst)
    rows = np.concatenate([worst, rng.choice(rest, k - len(worst), replace=False)])
    base = head.loss(val)
    actual = []
    for i, r in enumerate(rows):
        refit = api.fit(train, exclude=[train.ids[r]], init=head, dtype="float64", **kw)
        actual.append(refit.loss(val) - base)
        if progress:
            progress(i + 1)
    table = pd.DataFrame(
        {"id": train.ids[rows], "predicted": infl[rows], "actual": np.array(actual)}
    )
    rho = float(spearmanr(table["predicted"], table["actual"])[0])
    return rho, table
