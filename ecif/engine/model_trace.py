"""Trace-back in the model modes: a query's loss and gradient through the trainable part, and
every training pair's relative influence on it (docs/math.md sections 8 and 12).

A query is one cached feature row of one modality against candidate rows of the other, with
one or more correct answers: L = -log sum_{c correct} softmax_c(t <x(theta), y_c(theta)>)
(image -> text; text -> image swaps the towers), as in the head mode's ``TraceQuery``.
rIS_n = grad R_n^T H^-1 g / ||H^-1 grad R_n||: the numerator is the scoring pass along
w = H^-1 g, the denominator the random-probe norms (``model_probes``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ecif.engine.encoder_influence import ModelInverse, score_pass
from ecif.engine.encoder_model import EncoderModel
from ecif.engine.model_probes import DEFAULT_PROBES, probe_norms

DIRECTIONS = ("image->text", "text->image")


def query_logits(
    model: EncoderModel,
    query,
    candidates,
    *,
    direction: str = "image->text",
    theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """(C,) logits t <x, y_c> of one query: ``query`` one feature row (image features for
    image->text) against ``candidates`` (C, F) rows of the other modality."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    theta = model.theta if theta is None else theta
    kw = dict(dtype=model.dtype, device=model.device)
    q = _rows(query, kw).reshape(1, -1)
    c = _rows(candidates, kw)
    if c.ndim != 2:
        raise ValueError("candidates must be (C, F)")
    qs = q.expand(len(c), -1)
    if direction == "image->text":
        x, y, log_t = model.part.embed(theta, qs, c)
        return log_t.exp() * (y @ x[0])
    x, y, log_t = model.part.embed(theta, c, qs)
    return log_t.exp() * (x @ y[0])


def _rows(a, kw: dict) -> torch.Tensor:
    """A tensor of ``a``: arrays are copied (feature caches are read-only memory maps),
    tensors are detached and moved."""
    if torch.is_tensor(a):
        return a.detach().to(**kw)
    return torch.as_tensor(np.array(a), **kw)


def loss_of_logits(s: torch.Tensor, positive) -> torch.Tensor:
    """-log sum_{c correct} softmax_c(s)."""
    pos = torch.as_tensor(np.asarray(positive), dtype=torch.bool, device=s.device)
    if len(pos) != len(s):
        raise ValueError("give one positive flag per candidate")
    if not bool(pos.any()):
        raise ValueError("the query has no correct answer among its candidates")
    return -(torch.logsumexp(s[pos], 0) - torch.logsumexp(s, 0))


def query_loss(
    model: EncoderModel,
    query,
    candidates,
    positive,
    *,
    direction: str = "image->text",
    theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """L(theta) of one query: ``query_logits`` and ``positive`` (C,) bool."""
    s = query_logits(model, query, candidates, direction=direction, theta=theta)
    return loss_of_logits(s, positive)


def query_gradient(model: EncoderModel, query, candidates, positive, **kw) -> torch.Tensor:
    """grad_theta L of one query (no pull): the ``query_grad`` of ``relative_influence``."""
    theta = model.theta.detach().requires_grad_(True)
    loss = query_loss(model, query, candidates, positive, theta=theta, **kw)
    (g,) = torch.autograd.grad(loss, theta)
    return g.detach()


def relative_influence(
    model: EncoderModel,
    train,
    query_grad: torch.Tensor,
    *,
    norms: np.ndarray | None = None,
    probes: int | torch.Tensor = DEFAULT_PROBES,
    inverse: ModelInverse | None = None,
    neg: str = "exact",
    seed: int = 0,
) -> pd.DataFrame:
    """Every training pair's relative influence on the query: columns row, id,
    relative_influence, influence (g^T d_n / N). Negative: removing the pair would lower the
    query's loss (it pushed the model towards the mistake). ``norms``: precomputed
    ||H^-1 grad R_n|| (one per row), else estimated from ``probes``."""
    inv = inverse or ModelInverse(model, train.image, train.text)
    w = inv.solve(query_grad)
    d_pos, d_neg = score_pass(model, train.image, train.text, w, neg=neg)
    dot = d_pos + d_neg
    if norms is None:
        norms = probe_norms(model, train, probes=probes, inverse=inv, seed=seed)
    norms = np.asarray(norms, dtype=np.float64)
    if len(norms) != len(dot):
        raise ValueError(f"norms has {len(norms)} entries; the model has {len(dot)} rows")
    ids = getattr(train, "ids", None)
    rows = np.arange(len(dot))
    return pd.DataFrame(
        {
            "row": rows,
            "id": rows if ids is None else np.asarray(ids),
            "relative_influence": dot / np.maximum(norms, 1e-30),
            "influence": dot / model.n_norm,
        }
    )
