"""The head's logit scale and pull, set from the user's data.

The scale is measured: half the temperature at which the pretrained similarity's InfoNCE is
lowest on the trusted pairs, so the head starts from logits as sharp as the data supports
(CLIP's own 100 saturates the softmax on most data and ranks misaligned pairs worse). The
pull is a fixed default. Searching the pull or the scale by validation loss, or by how well
planted probe pairs (``make_probes``) are ranked, was measured against this rule over 4
geometries x 5 noise kinds x 3 seeds (benchmarks/bench_select.py): within noise (mean AP
0.768 rule, 0.770 validation loss, 0.767 probes; probes minus rule -0.0008, 95% interval
[-0.025, +0.023] over seeds), at about 5.5x the seconds for the search. The rule stays the
default for its cost; ``make_probes`` stays for that study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ecif.data.embedding_set import EmbeddingSet
from ecif.engine.batches import make_partition
from ecif.options import option


@dataclass
class SelectArgs:
    """How the head's scale and pull are set when they are "auto"."""

    scale_factor: float = option(
        0.5, help="auto scale: this times the calibrated temperature of the pretrained similarity"
    )
    lam: float = option(1e-2, help="auto pull: this lam")
    max_pairs: int = option(20_000, help="pairs the temperature is calibrated on")


@dataclass
class HeadChoice:
    """What was chosen and why (recorded in every output)."""

    logit_scale: float
    lam: float
    calibrated_scale: float | None = None
    reason: str = ""

    def record(self) -> dict:
        """JSON-ready: what was chosen and why."""
        return {
            "logit_scale": self.logit_scale,
            "lam": self.lam,
            "calibrated_scale": self.calibrated_scale,
            "reason": self.reason,
        }

    def summary(self) -> str:
        return describe_choice(self.record())


def describe_choice(record: dict) -> str:
    """One line: the chosen logit scale and pull, and why."""
    return (
        f"logit scale {record['logit_scale']:.3g}, lam {record['lam']:g} "
        f"({record.get('reason', '')})"
    )


def describe_fit(info: dict) -> tuple[str, str] | None:
    """(what was fit, one line on its scale and pull) from an audit's record: the head's
    search, or in a model mode the part's scale and pull (the head's search does not apply
    there); None when the record says neither."""
    params = (info.get("options") or {}).get("params") or "head"
    if params != "head":
        auto = info["options"].get("logit_scale") == "auto"
        how = "calibrated on the trusted pairs" if auto else "as given"
        return params, f"logit scale {info['logit_scale']:.3g} ({how}), lam {info['lam']:g}"
    choice = info.get("head_choice")
    return ("head", describe_choice(choice)) if choice else None


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
    logit_scale: float | str = "auto",
    lam: float | str = "auto",
    args: SelectArgs | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> HeadChoice:
    """The head's logit scale and pull for this audit (explicit values are kept).

    "auto" scale: ``args.scale_factor`` times the temperature that calibrates the pretrained
    similarity on the trusted pairs (the validation set; the training set without one), so
    the head starts from logits as sharp as the data supports; "auto" pull: ``args.lam``.
    Why not a search: over 4 geometries x 5 noise kinds x 3 seeds, choosing the pull (or the
    scale) by validation loss or by how well planted probes are ranked gave the same AP as
    this rule within the noise (paired by seed, 95% intervals containing 0), and fitting six
    heads instead of one cost about 5.5x the seconds (benchmarks/bench_select.py,
    benchmarks/README.md).
    """
    args = args or SelectArgs()
    ref = val if val is not None else train
    t_cal = calibrated_scale(ref.image, ref.text, batch_size, seed, args.max_pairs)
    why = []
    if logit_scale == "auto":
        t = args.scale_factor * t_cal
        source = "validation" if val is not None else "training"
        why.append(
            f"scale = {args.scale_factor:g} x {t_cal:.3g}, the temperature that calibrates "
            f"the pretrained similarity on the {source} pairs"
        )
    else:
        t = float(logit_scale)
        why.append("scale as given")
    if lam == "auto":
        pull = args.lam
        why.append(f"lam = {pull:g} (the default pull)")
    else:
        pull = float(lam)
        why.append("lam as given")
    return HeadChoice(t, pull, calibrated_scale=t_cal, reason="; ".join(why))
