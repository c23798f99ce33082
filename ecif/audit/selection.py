"""Choosing the head (logit scale, pull) and the signal weights by measurement on the user's data.

Validation loss is not the goal: a sharp head that fits the validation set best can rank
misaligned pairs worst. What a user wants is a ranking that puts misaligned pairs first, so
that is what is measured, without labels: a few percent of the (sub-sampled) training pairs
are copied with planted captions (probes: another pair's caption, the caption of the nearest
image's pair, a generic caption), the head is fit on pairs and probes at each candidate
setting, and the candidate whose ``misalign_score`` ranks the probes highest wins. The logit
scale is anchored at the temperature that calibrates the pretrained similarity on the trusted
pairs; the pull is searched on a short path, warm-started from the strongest pull.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import ecif.api as api
from ecif.audit.combine import CANDIDATE_WEIGHTS, Standardiser, combine
from ecif.audit.metrics import auroc
from ecif.data.embedding_set import EmbeddingSet
from ecif.engine.batches import make_partition
from ecif.engine.head import Head


@dataclass
class SelectArgs:
    """How the head is chosen when ``logit_scale`` or ``lam`` is "auto"."""

    scale_multiples: tuple[float, ...] = (0.5, 1.0)  # times the calibrated scale
    lams: tuple[float, ...] = (1e-1, 1e-2, 1e-3)  # strongest pull first (warm starts)
    probe_fraction: float = 0.1  # probes per selection pair
    max_pairs: int = 20_000  # selection runs on at most this many training pairs
    margin: float = 0.005  # probe AUROC a candidate must gain over the equal-weight default


@dataclass
class HeadChoice:
    """What was chosen and why (recorded in every output)."""

    logit_scale: float
    lam: float
    weights: dict[str, float]
    calibrated_scale: float | None = None
    probe_auroc: float | None = None
    reason: str = ""
    candidates: list[dict] = field(default_factory=list)

    def record(self) -> dict:
        """JSON-ready: what was chosen, why, and every candidate measured."""
        return {
            "logit_scale": self.logit_scale,
            "lam": self.lam,
            "weights": dict(self.weights),
            "calibrated_scale": self.calibrated_scale,
            "probe_auroc": self.probe_auroc,
            "reason": self.reason,
            "candidates": list(self.candidates),
        }

    def summary(self) -> str:
        return describe_choice(self.record())


def describe_choice(record: dict) -> str:
    """One line: the chosen logit scale, pull and misalign_score weights, and why."""
    from ecif.audit.combine import describe_weights

    return (
        f"logit scale {record['logit_scale']:.3g}, lam {record['lam']:g}; misalign_score = "
        f"{describe_weights(record.get('weights') or {})} ({record.get('reason', '')})"
    )


def calibrated_scale(
    x, y, batch_size: int = 256, seed: int = 0, max_pairs: int = 20_000, bounds=(1.0, 200.0)
) -> float:
    """The logit scale t minimising the mean symmetric InfoNCE of the pretrained similarity
    (t * cos) in batches of ``batch_size``: the loss is convex in t, so a golden-section
    search on log t finds it."""
    x = np.asarray(x[:max_pairs], dtype=np.float32)
    y = np.asarray(y[:max_pairs], dtype=np.float32)
    part = make_partition(len(x), batch_size, seed)
    cos = []
    for rows in part.index:
        rows = rows[rows >= 0]
        if len(rows) > 1:
            xb, yb = torch.from_numpy(x[rows]), torch.from_numpy(y[rows])
            xb = xb / xb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            yb = yb / yb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            cos.append((xb @ yb.T).double())

    def loss(log_t: float) -> float:
        t, total, count = math.exp(log_t), 0.0, 0
        for c in cos:
            s = t * c
            diag = s.diagonal()
            total += float((2 * diag - s.logsumexp(1) - s.logsumexp(0)).sum())
            count += len(c)
        return -total / max(count, 1)

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return float(math.exp((lo + hi) / 2))


def make_probes(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of random pairs with planted captions, a third each: ``shuffle`` (another probe's
    text), ``near`` (the text of the nearest image's pair whose text differs), ``generic``
    (the mean text direction: a caption that fits every image a little)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    m = min(n, max(30, int(round(fraction * n))))
    src = rng.choice(n, m, replace=False)
    px, py = np.asarray(x[src], dtype=np.float32).copy(), np.empty((m, y.shape[1]), np.float32)
    thirds = np.array_split(np.arange(m), 3)
    kind = np.empty(m, dtype=object)
    sh, near, gen = thirds
    py[sh] = y[src[sh]][np.roll(np.arange(len(sh)), 1)]
    kind[sh] = "shuffle"
    xs = _unit(np.asarray(x, dtype=np.float32))
    ys = _unit(np.asarray(y, dtype=np.float32))
    sim = xs[src[near]] @ xs.T
    sim[np.arange(len(near)), src[near]] = -np.inf
    order = np.argsort(-sim, axis=1)[:, :64]
    for r, i in enumerate(src[near]):
        differs = order[r][ys[order[r]] @ ys[i] < 0.98]
        py[near[r]] = y[differs[0] if len(differs) else order[r, 0]]
    kind[near] = "near"
    mean = ys.mean(0)
    py[gen] = _unit(
        mean[None]
        + 0.05
        * rng.standard_normal((len(gen), y.shape[1]))
        / np.sqrt(y.shape[1])
        * np.linalg.norm(mean)
    )
    kind[gen] = "generic"
    return px, py, kind


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def choose_head(
    train: EmbeddingSet,
    val: EmbeddingSet | None,
    *,
    fit: Callable[..., Head],
    signals: Callable[[Head, EmbeddingSet, EmbeddingSet | None, np.ndarray], dict],
    logit_scale: float | str = "auto",
    lam: float | str = "auto",
    weights: dict[str, float] | None = None,
    args: SelectArgs | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> HeadChoice:
    """Measure candidate heads on probes and return the best (explicit values are kept).

    ``fit(data, logit_scale=, lam=, init=)`` fits a head with the audit's options;
    ``signals(head, data, val, is_probe)`` returns the suspicions of ``SIGNALS`` for every row
    of ``data`` (the audit's own way of scoring: against ``val``, or without one). Without a
    validation set, the half of the selection pairs that the first head fits best stands in
    for it. ``weights``: fixed signal weights (only the head is chosen).
    """
    from tqdm.auto import tqdm

    args = args or SelectArgs()
    rng = np.random.default_rng(seed)
    n = len(train)
    rows = np.sort(rng.choice(n, args.max_pairs, replace=False)) if n > args.max_pairs else None
    sub = train.subset(rows) if rows is not None else train
    x, y = np.asarray(sub.image, np.float32), np.asarray(sub.text, np.float32)
    ref = val if val is not None else sub
    t_cal = calibrated_scale(ref.image, ref.text, batch_size, seed)
    scales = (
        [float(logit_scale)] if logit_scale != "auto" else [m * t_cal for m in args.scale_multiples]
    )
    lams = [float(lam)] if lam != "auto" else list(args.lams)
    candidates = [weights] if weights is not None else list(CANDIDATE_WEIGHTS)
    px, py, _ = make_probes(x, y, args.probe_fraction, seed + 1)
    data = EmbeddingSet(np.concatenate([x, px]), np.concatenate([y, py]), check_finite=False)
    is_probe = np.r_[np.zeros(len(x), bool), np.ones(len(px), bool)]
    cells = []
    bar = tqdm(total=len(scales) * len(lams), desc="choosing the head", disable=not progress)
    proxy = val
    for t in scales:
        head = None
        for lm in lams:
            head = fit(data, logit_scale=t, lam=lm, init=head)
            if proxy is None:
                proxy = _best_fitting(head, data, ~is_probe)
            sig = signals(head, data, proxy, is_probe)
            stats = {k: Standardiser.of(v[~is_probe]) for k, v in sig.items()}
            for k, w in enumerate(candidates):
                cells.append(
                    {
                        "logit_scale": t,
                        "lam": lm,
                        "weights": k,
                        "probe_auroc": auroc(is_probe, combine(sig, w, stats)),
                        "converged": bool(head.info.get("converged", True)),
                    }
                )
            bar.update(1)
    bar.close()

    def key(c):
        return (c["converged"], c["probe_auroc"])

    best = max(cells, key=key)
    default = max((c for c in cells if c["weights"] == 0), key=key)
    if best["probe_auroc"] < default["probe_auroc"] + args.margin:
        best = default  # not clearly better than the equal-weight sum: keep the sum
    reason = (
        f"best probe AUROC {best['probe_auroc']:.3f} of {len(cells)} candidates on "
        f"{len(x):,} pairs + {len(px):,} probes; calibrated scale {t_cal:.3g}"
    )
    return HeadChoice(
        logit_scale=best["logit_scale"],
        lam=best["lam"],
        weights=dict(candidates[best["weights"]]),
        calibrated_scale=t_cal,
        probe_auroc=best["probe_auroc"],
        reason=reason,
        candidates=[{**c, "weights": candidates[c["weights"]]} for c in cells],
    )


def _best_fitting(head, data: EmbeddingSet, rows: np.ndarray) -> EmbeddingSet:
    """The half of ``rows`` with the lowest own loss under ``head``: a stand-in validation set."""
    loss = api.pair_losses(head, data)
    idx = np.nonzero(rows)[0]
    keep = idx[loss[idx] <= np.quantile(loss[idx], 0.5)]
    return data.subset(keep)
