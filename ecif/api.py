"""The Python front door: fit a head, score pairs, solve per-pair influence.

train = ecif.EmbeddingSet(image=..., text=..., ids=...)
head = ecif.fit(train, batch_size=256, seed=0)
df = ecif.score(head, train, val=val_set)
head2 = ecif.fit(train, batch_size=256, seed=0, exclude=[...], init=head)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ecif.engine.batch_context import DEFAULT_TOP, context_dots, context_norms
from ecif.engine.cluster_rows import ClusterRows  # noqa: F401  (ecif.ClusterRows)
from ecif.engine.fit import FitArgs, fit_head, new_head
from ecif.engine.head import CLIP_LOGIT_SCALE, Head, as_arrays
from ecif.engine.influence import classification_gradient, pair_gradients, score_pass
from ecif.engine.influence import loss_gradient as _loss_gradient
from ecif.engine.influence import negative_breakdown as _negative_breakdown
from ecif.engine.inverse_hessian import InverseHessian, SolverArgs
from ecif.engine.relative import candidate_pass
from ecif.engine.row_sums import RowSource
from ecif.options import rename_keywords, renamed, with_options


def _ids(data) -> np.ndarray:
    x, _ = as_arrays(data)
    return np.asarray(getattr(data, "ids", np.arange(len(x))))


def _positions(data, ids: Sequence[Any] | np.ndarray) -> np.ndarray:
    if hasattr(data, "positions"):
        return data.positions(ids)
    return np.asarray(ids, dtype=np.int64)


def _check_widths(head: Head, data, what: str) -> None:
    x, y = as_arrays(data)
    if len(x) == 0:
        raise ValueError(f"the {what} set is empty")
    if (x.shape[1], y.shape[1]) != tuple(head.m.shape):
        raise ValueError(
            f"the {what} set has widths image={x.shape[1]}, text={y.shape[1]} but the head was fit "
            f"on image={head.m.shape[0]}, text={head.m.shape[1]}: embed both with the same model"
        )


def fit(
    train,
    args: FitArgs | None = None,
    *,
    exclude: Sequence[Any] | None = None,
    init: Head | None = None,
    groups: np.ndarray | None = None,
    rows: RowSource | None = None,
    members: np.ndarray | None = None,
    **options: Any,
) -> Head:
    """Fit the bilinear head on ``train`` to a stationary point.

    Options: ``args`` (a ``FitArgs``) and/or its fields as keywords (``batch_size``, ``seed``,
    ``lam``, ``logit_scale``, ``learn_scale``, ``dtype``, ``device``, ``max_iter``, ``tol``,
    ``optimizer``, ``warmup_epochs``, ``whiten``, ``progress``, ...; their defaults and meaning:
    ``ecif.engine.fit.FitArgs``). ``logit_scale`` None: the set's own (``train.logit_scale``)
    or 100, CLIP's.

    ``exclude``: ids removed from their batches (the partition of ``init`` or of ``seed`` is
    kept; the per-pair weight 1/N stays that of the full set, so a removal deletes exactly
    that pair's terms). ``init``: warm start (and its partition). ``groups``: a label per row
    (the input shard); batches never cross groups (but groups smaller than half a batch join
    their neighbours: ``make_partition``), so shards can be scored one by one.
    ``rows``: where the passes over the pairs run; ``ecif.ClusterRows(client, x, y)`` keeps
    them on a Dask cluster's workers (the same head, bitwise, as here without a warm-up).
    ``members``: row positions that take part, the others in no batch (an audit's exact
    copies of a pair): the head of fitting ``members`` alone, its batches re-indexed.

    ``tol``: on the gradient's max-abs. ``head.info["converged"]`` is True when the fit met
    it; when it did not, a ``ecif.ConvergenceWarning`` says so and what to try
    (``head.info["stop"]``: ``max_iter``, or ``precision``: no step lowers the gradient any
    more at this dtype's precision).
    """
    options = rename_keywords(options, {"solver": "optimizer"}, "ecif.fit")  # one release
    args = with_options(FitArgs, args, options, "ecif.fit")
    x, y = as_arrays(train)
    if len(x) < 2:
        raise ValueError(f"need at least 2 pairs to fit a contrastive head; got {len(x)}")
    if args.logit_scale is None:
        scale = getattr(train, "logit_scale", None) or CLIP_LOGIT_SCALE
        args = replace(args, logit_scale=float(scale))
    if members is not None and init is not None:
        raise ValueError("members and init both set the batches: give one")
    head = new_head(x, y, args, groups=groups, members=members)
    if init is not None:
        if init.partition.n != len(x):
            raise ValueError(f"init was fit on {init.partition.n} pairs, train has {len(x)}")
        head = replace(  # and its 1/N: a head fit on some rows only (members) keeps theirs
            head,
            partition=init.partition,
            m0=init.m0.to(head.dtype),
            log_scale0=init.log_scale0,
            n_norm=init.n_norm,
        )
    if exclude is not None and len(exclude):
        head = replace(head, partition=head.partition.without(_positions(train, exclude)))
    return fit_head(head, x, y, args, init=init, rows=rows)


def loss_gradient(head: Head, data) -> torch.Tensor:
    """Gradient of the mean symmetric InfoNCE on ``data`` w.r.t. the head's parameters."""
    _check_widths(head, data, "query")
    x, y = as_arrays(data)
    return _loss_gradient(head, x, y)


@renamed(method="solver")
def solver(
    head: Head,
    train,
    args: SolverArgs | None = None,
    *,
    rows: RowSource | None = None,
    **options: Any,
) -> InverseHessian:
    """The inverse-Hessian operator of a fitted head. Options: ``args`` (a ``SolverArgs``)
    and/or its fields as keywords: ``solver`` (``exact``, ``cg``, ``ekfac``, ``auto``),
    ``tol``, ``hessian_batches``, ``ekfac_batches``, ... (``ecif.engine.inverse_hessian``).
    ``rows``: where its passes run (``ecif.ClusterRows``: on a Dask cluster)."""
    args = with_options(SolverArgs, args, options, "ecif.solver")
    x, y = as_arrays(train)
    return InverseHessian(head, x, y, args, rows=rows)


@renamed(method="solver")
def score(
    head: Head,
    train,
    val=None,
    *,
    query_grad: torch.Tensor | None = None,
    neg: str = "exact",
    solver: str | SolverArgs | None = None,
    inverse: InverseHessian | None = None,
    progress: bool = False,
    rows: RowSource | None = None,
) -> pd.DataFrame:
    """Influence of every training pair on the validation loss, one row per pair in train order.

    Columns: id, influence, influence_pos, influence_neg. ``influence`` is the predicted change
    of the validation loss if the pair is removed: negative = removing it helps = harmful.
    Give ``val`` (an EmbeddingSet) or ``query_grad`` (a flat gradient, e.g. of a test loss).
    ``solver``: the inverse-Hessian solver's name or its ``SolverArgs`` (None: the defaults,
    ``auto``); ``inverse``: one already built. ``rows``: where the solve's and the scoring's
    passes run (``ecif.ClusterRows``: on a Dask cluster).
    """
    _check_widths(head, train, "training")
    x, y = as_arrays(train)
    if query_grad is None:
        if val is None:
            raise ValueError(
                "score needs a validation set (val=) or a query gradient (query_grad=)"
            )
        _check_widths(head, val, "validation")
        vx, vy = as_arrays(val)
        query_grad = _loss_gradient(head, vx, vy)
    if not isinstance(solver, SolverArgs):
        solver = SolverArgs() if solver is None else SolverArgs(solver=solver)
    inv = inverse or InverseHessian(head, x, y, solver, rows=rows)
    w = inv.solve(query_grad.to(head.dtype))
    bar = tqdm(total=head.partition.num_batches, desc="scoring", unit="batch", disable=not progress)
    if rows is None:
        d_pos, d_neg = score_pass(head, x, y, w, neg=neg, progress=bar.update)
    else:
        d_pos, d_neg = rows.score(head, w, neg=neg, progress=bar.update)
    bar.close()
    out_dtype = np.float64 if head.dtype == torch.float64 else np.float32  # keep the head's
    df = pd.DataFrame(
        {
            "id": _ids(train),
            "influence": ((d_pos + d_neg) / head.n_norm).astype(out_dtype),
            "influence_pos": (d_pos / head.n_norm).astype(out_dtype),
            "influence_neg": (d_neg / head.n_norm).astype(out_dtype),
        }
    )
    df.attrs.update(solver=dict(inv.info), neg=neg)
    return df


def pair_losses(head: Head, data) -> np.ndarray:
    """Each pair's own loss -log p_nn - log q_nn under the head, within its batch (the head's
    partition of ``data``, so ``data`` is the set the head was fit on, or one of its shards
    with a matching partition). Rows in no batch (removed) are NaN."""
    from ecif.engine.batches import iter_chunks
    from ecif.engine.contrastive import batch_stats
    from ecif.engine.contrastive import pair_losses as _pair_losses

    x, y = as_arrays(data)
    out = np.full(len(x), np.nan)
    for ch in iter_chunks(x, y, head.partition, dtype=head.dtype, device=head.m.device):
        s = head.logit_scale * (ch.x @ head.m) @ ch.y.transpose(-1, -2)
        loss = _pair_losses(batch_stats(s, ch.mask)).cpu().numpy()
        m = ch.mask.cpu().numpy()
        out[ch.rows[m]] = loss[m]
    return out


def self_influence(
    head: Head,
    train,
    rows: Sequence[int] | None = None,
    *,
    neg: str = "exact",
    inverse: InverseHessian | None = None,
) -> np.ndarray:
    """grad R_n^T H^-1 grad R_n for the given row positions (all rows if None).

    Scores pairs without a validation set: a large value means the model bends far to fit
    the pair. Costs a per-pair gradient (B^2 d + B d^2) and a solve per pair.
    """
    x, y = as_arrays(train)
    rows = np.arange(len(x)) if rows is None else np.asarray(rows)
    inv = inverse or InverseHessian(head, x, y, SolverArgs(solves=len(rows)))
    out = np.zeros(len(rows))
    for start in range(0, len(rows), 256):
        sel = rows[start : start + 256]
        g_pos, g_neg = pair_gradients(head, x, y, sel, neg=neg)
        out[start : start + len(sel)] = inv.quad_form(g_pos + g_neg).cpu().numpy()
    return out


def relative_influence(
    head: Head,
    train,
    query_grad: torch.Tensor,
    rows: Sequence[int],
    *,
    neg: str = "exact",
    inverse=None,
    norms: np.ndarray | None = None,
    rank_tol: float = 1e-3,
    context: dict | None = None,
    context_top: int = DEFAULT_TOP,
    batches_per_step: int = 8,
) -> pd.DataFrame:
    """RelatIF-style trace-back: g_test^T d_n / ||d_n||, d_n = H^-1 grad R_n, for candidate rows.

    Negative = removing the pair would lower the test loss (it pushed the model towards the
    mistake); positive = it helped. Also returns the raw influence g_test^T d_n / N.
    The numerator needs one solve, w = H^-1 g_test, and the scoring pass's directional
    derivative; ||d_n|| is a per-pair solve when the solver is exact, else EK-FAC's closed
    form ||(Q1^T G_n Q2) / D||_F (``attrs["norm"]`` says which). ``norms`` (one per training
    pair, e.g. from ``ecif index``) skips that part: the query then costs one pass over the
    candidates' batches with W cut to its numerical rank (``rank_tol``), or, with the stored
    batch ``context`` (``ecif.engine.batch_context``), only each candidate's own row and column
    plus its ``context_top`` heaviest batch members (``attrs["max_bound"]`` bounds the rest).
    """
    x, y = as_arrays(train)
    rows = np.asarray(rows, dtype=np.int64)
    solves = 1 + (len(rows) if norms is None else 0)  # exact norms: one solve per candidate
    inv = inverse or InverseHessian(head, x, y, SolverArgs(solves=solves))
    w = inv.solve(query_grad.to(head.dtype))
    bound = None
    if norms is None and context is not None and inv.method == "ekfac" and not head.learn_scale:
        # EK-FAC norms from the context's low-rank gradients: no batch recomputed
        dot, bound = context_dots(head, x, y, context, w, rows, top=context_top, neg=neg)
        norm, _ = context_norms(head, x, y, context, inv.ekfac, rows, top=context_top, neg=neg)
        how = "ekfac"
    elif norms is None:
        dot, norm = candidate_pass(
            head, x, y, w, rows, neg=neg, inverse=inv, batches_per_step=batches_per_step
        )
        how = "ekfac" if inv.method != "exact" and not head.learn_scale else inv.method
    else:
        if len(norms) != head.partition.n:
            raise ValueError(f"norms has {len(norms)} entries; the head has {head.partition.n}")
        if context is not None:  # no batch recomputed: the candidates' own rows and columns
            dot, bound = context_dots(head, x, y, context, w, rows, top=context_top, neg=neg)
        else:
            dot, bound = candidate_pass(
                head, x, y, w, rows, neg=neg, rank_tol=rank_tol, batches_per_step=batches_per_step
            )
        norm = np.asarray(norms)[rows]
        how = "precomputed"
    df = pd.DataFrame(
        {
            "row": rows,
            "id": _ids(train)[rows],
            "relative_influence": dot / np.maximum(norm, 1e-30),
            "influence": dot / head.n_norm,
        }
    )
    df.attrs.update(norm=how, solver=dict(inv.info))
    if bound is not None:
        df.attrs["max_bound"] = float(np.max(bound, initial=0.0))
    return df


def negative_breakdown(
    head: Head, data, w: torch.Tensor, row: int, *, neg: str = "exact"
) -> pd.DataFrame:
    """How pair ``row``'s negative influence (``influence_neg`` for the direction ``w``, e.g.
    an audit's ``w.npy``) splits over the other members of its batch: one row per member,
    the shares summing to the pair's ``influence_neg``. ``data`` as for ``score``."""
    x, y = as_arrays(data)
    return _negative_breakdown(head, x, y, w, row, neg=neg)


__all__ = [
    "FitArgs",
    "Head",
    "SolverArgs",
    "classification_gradient",
    "fit",
    "loss_gradient",
    "negative_breakdown",
    "pair_losses",
    "relative_influence",
    "score",
    "self_influence",
    "solver",
]
