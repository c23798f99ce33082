"""Evidence that removing flagged pairs helps: drop, refit, and compare with fair baselines.

Every strategy drops the same number of pairs and refits the head on the same partition,
so the only difference is WHICH pairs go: ecif's top misalign_score, random ones, or the
lowest clip_score. The one-step ECIF edit theta + (1/N) H^-1 sum grad R_n predicts the
refit without refitting (docs/math.md section 10).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

import ecif.api as api
from ecif.audit.labels import label_codes
from ecif.engine.head import Head
from ecif.engine.influence import pair_gradients
from ecif.progress import step


def retrieval_accuracy(
    head: Head, val, chunk: int = 4096, labels: np.ndarray | None = None
) -> float:
    """Image->text top-1 accuracy on ``val``: each image against all of val's captions; the
    prediction is right when its caption carries the image's label (``labels``, integer codes;
    default ``ecif.audit.labels.label_codes(val)``: the same caption string)."""
    codes = torch.as_tensor(label_codes(val) if labels is None else np.asarray(labels))
    x = torch.as_tensor(np.asarray(val.image, dtype=np.float32), dtype=head.dtype)
    y = torch.as_tensor(np.asarray(val.text, dtype=np.float32), dtype=head.dtype)
    ty = (head.m @ y.T) * head.logit_scale
    hits = 0
    for s in range(0, len(x), chunk):
        pred = (x[s : s + chunk] @ ty).argmax(1)
        hits += int((codes[pred] == codes[s : s + len(pred)]).sum())
    return hits / len(x)


def one_step_edit(head: Head, train, rows: np.ndarray, inverse=None, neg: str = "exact") -> Head:
    """The head ECIF predicts after removing ``rows``: theta + (1/N) H^-1 sum_n grad R_n."""
    x, y = train.image, train.text
    total = torch.zeros(head.num_params, dtype=head.dtype)
    for s in range(0, len(rows), 256):
        g_pos, g_neg = pair_gradients(head, x, y, rows[s : s + 256], neg=neg)
        total += (g_pos + g_neg).sum(0)
    inv = inverse or api.solver(head, train)
    step = inv.solve(total / head.n_norm)
    return head.with_theta(head.theta() + step, info={"one_step": True})


def drop_choices(
    table: pd.DataFrame, count: int, seed: int = 0, pool: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The rows each strategy drops (``count`` each): ecif's top ``misalign_score``, random
    rows, the lowest ``clip_score``. ``table`` is the audit table in training order;
    ``pool``: the rows to choose from (the head's batches: an audit that collapsed exact
    copies holds each pair once, as its first row; default all)."""
    pool = np.arange(len(table)) if pool is None else np.asarray(pool)
    n = len(pool)
    if not 0 < count < n:
        raise ValueError(f"the number of pairs to drop must be in (0, {n}); got {count}")
    rng = np.random.default_rng(seed)
    sub = table.iloc[pool]
    return {
        "ecif": pool[np.argsort(-sub["misalign_score"].to_numpy(), kind="stable")[:count]],
        "random": rng.choice(pool, count, replace=False),
        "clip_score": pool[np.argsort(sub["clip_score"].to_numpy(), kind="stable")[:count]],
    }


def compare_cleaning(
    head: Head,
    train,
    val,
    table: pd.DataFrame,
    count: int | None = None,
    seed: int = 0,
    fit_kwargs: dict | None = None,
    label_col: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Validation loss and retrieval accuracy after dropping ``count`` pairs by each strategy.

    ``table`` is the audit table (train order). ``count`` defaults to the flagged count.
    ``label_col``: a validation metadata column whose equal values count as the right answer
    (default: the same caption; ``ecif.audit.labels``). ``progress``: a spinner per refit.
    """
    pool = head.partition.members()  # each pair once: a collapsed copy is in no batch
    pool = None if len(pool) == len(table) else pool
    if count is None:
        count = table["is_misaligned"].to_numpy()[slice(None) if pool is None else pool].sum()
    count = int(count)
    choices = drop_choices(table, count, seed, pool)
    kw = dict(
        batch_size=head.batch_size,
        seed=head.seed,
        lam=head.lam,
        logit_scale=head.logit_scale,
        dtype="float64" if head.dtype == torch.float64 else "float32",
    )
    kw.update(fit_kwargs or {})
    labels = label_codes(val, label_col)
    rows = [_row("none (all pairs)", head, val, 0, labels)]
    for name, drop in choices.items():
        with step(f"refitting without the {count:,} pairs picked by {name}", progress):
            refit = api.fit(train, exclude=train.ids[drop], init=head, **kw)
        rows.append(_row(f"drop {name}", refit, val, count, labels))
    with step("the one-step ECIF edit", progress):
        edit = one_step_edit(head, train, choices["ecif"])
    rows.append(_row("ecif one-step edit (no refit)", edit, val, count, labels))
    return pd.DataFrame(rows)


def _row(name: str, head: Head, val, dropped: int, labels: np.ndarray) -> dict:
    return {
        "strategy": name,
        "dropped": dropped,
        "val_loss": head.loss(val),
        "val_i2t_acc": retrieval_accuracy(head, val, labels=labels),
    }
