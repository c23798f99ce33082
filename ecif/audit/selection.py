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

from ecif.audit.baselines import CONSENSUS_K
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
    untrusted_drop: float = option(
        0.2,
        help="without a validation set: the share of training pairs, those the pretrained "
        "similarity fits worst, left out of the temperature's calibration",
    )


TRIM_ROUNDS = 3  # calibrate-and-drop rounds of trimmed_scale (the drop settles by then)


@dataclass
class HeadChoice:
    """What was chosen and why (recorded in every output)."""

    logit_scale: float
    lam: float
    calibrated_scale: float | None = None
    reason: str = ""
    # without a validation set: the calibration on every training pair, untrimmed (the
    # projection mode's cross-fit uses it, self-influence the geometric mean with calibrated_scale;
    # docs/math.md section 12)
    all_pairs_scale: float | None = None

    def record(self) -> dict:
        """JSON-ready: what was chosen and why."""
        return {
            "logit_scale": self.logit_scale,
            "lam": self.lam,
            "calibrated_scale": self.calibrated_scale,
            "all_pairs_scale": self.all_pairs_scale,
            "reason": self.reason,
        }

    def summary(self) -> str:
        return describe_choice(self.record())


def cross_fit_scale(params: str) -> str:
    """Which calibration a model mode's cross-fit takes without a validation set: "all"
    (every training pair) or "trimmed" (the pairs that fit best: lora's, whose low-rank part
    fits its noisy pairs far less than the projections; ``model_signals.untrusted_scale``)."""
    return "trimmed" if params == "lora" else "all"


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
        untrusted = (info.get("head_choice") or {}).get("all_pairs_scale") is not None
        how = "calibrated on the validation pairs"
        if untrusted and "self-influence" in (info.get("validation") or ""):
            drop = (info["options"].get("select") or {}).get("untrusted_drop", 0.2)
            how = (
                "geometric mean of the calibrations on all training pairs and on the "
                f"{1 - drop:.0%} that fit best"
            )
        elif untrusted and cross_fit_scale(params) == "trimmed":
            drop = (info["options"].get("select") or {}).get("untrusted_drop", 0.2)
            how = f"calibrated on the {1 - drop:.0%} of training pairs that fit best"
        elif untrusted:
            how = "calibrated on all training pairs"
        how = how if auto else "as given"
        return params, f"logit scale {info['logit_scale']:.3g} ({how}), lam {info['lam']:g}"
    choice = info.get("head_choice")
    return ("head", describe_choice(choice)) if choice else None


def _cosine_blocks(x, y, batch_size: int, seed: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    """(rows, cosine matrix) per batch of a seeded partition of the pairs."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    part = make_partition(len(x), batch_size, seed)
    blocks = []
    for rows in part.index:
        rows = rows[rows >= 0]
        if len(rows) > 1:
            xb, yb = torch.from_numpy(x[rows]), torch.from_numpy(y[rows])
            xb = xb / xb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            yb = yb / yb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            blocks.append((rows, (xb @ yb.T).double()))
    return blocks


def _pair_infonce(c: torch.Tensor, t: float) -> torch.Tensor:
    """Each pair's symmetric InfoNCE at logits t * c (both directions, summed)."""
    s = t * c
    return s.logsumexp(1) + s.logsumexp(0) - 2 * s.diagonal()


def calibrated_scale(
    x, y, batch_size: int = 256, seed: int = 0, max_pairs: int = 20_000, bounds=(1.0, 200.0)
) -> float:
    """The logit scale t minimising the mean symmetric InfoNCE of the pretrained similarity
    (t * cos) in batches of ``batch_size``: the loss is convex in t, so a golden-section
    search on log t finds it."""
    blocks = _cosine_blocks(x[:max_pairs], y[:max_pairs], batch_size, seed)
    count = max(sum(len(rows) for rows, _ in blocks), 1)

    def loss(log_t: float) -> float:
        t = math.exp(log_t)
        return sum(float(_pair_infonce(c, t).sum()) for _, c in blocks) / count

    return float(math.exp(golden_section(loss, math.log(bounds[0]), math.log(bounds[1]))))


def golden_section(f, lo: float, hi: float, steps: int = 40) -> float:
    """The minimiser of a function convex on [lo, hi]: the middle of the bracket left after
    ``steps`` golden-section steps (each shrinks it by 0.618)."""
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(steps):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2


def trimmed_scale(
    x,
    y,
    drop: float,
    batch_size: int = 256,
    seed: int = 0,
    max_pairs: int = 20_000,
    start: float | None = None,
) -> float:
    """``calibrated_scale`` on the pairs the pretrained similarity fits best, for pairs
    nobody vouches for: a misaligned pair's matched logit is no larger than its negatives',
    so every such pair pulls the calibrated temperature down (digits, 20% noise: 3.7 on
    the training pairs, 4.6 on their clean ones, 5.7 on the 80% that fit best; the last
    overshoots the clean pairs' own; docs/math.md section 7b). Calibrate, leave out the share ``drop`` with the highest InfoNCE at that
    scale, recalibrate; three rounds. ``start``: the calibration on all pairs, if known."""
    x = np.asarray(x[:max_pairs], dtype=np.float32)
    y = np.asarray(y[:max_pairs], dtype=np.float32)
    t = calibrated_scale(x, y, batch_size, seed) if start is None else start
    keep_n = int(round(len(x) * (1.0 - drop)))
    if drop <= 0 or keep_n < 2:
        return t
    blocks = _cosine_blocks(x, y, batch_size, seed)
    for _ in range(TRIM_ROUNDS):
        loss = np.zeros(len(x))
        for rows, c in blocks:
            loss[rows] = _pair_infonce(c, t).numpy()
        keep = np.sort(np.argsort(loss, kind="stable")[:keep_n])
        t = calibrated_scale(x[keep], y[keep], batch_size, seed)
    return t


# cosine at or above which two captions, or two images, count as one: a planted caption from
# a pair with either is no error (the row's own caption, or another caption of its picture)
SAME = 0.98


def make_probes(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of random pairs with planted captions, a third each: ``shuffle`` (another probe's
    text), ``near`` (the text of a near other picture's pair, from just beyond the consensus's
    neighbours: ``_nearest_other_caption``), ``generic`` (the mean text
    direction: a caption that fits every image a little). A row for which no caption plants
    an error (``_no_error``) is left out, so a kind can have fewer."""
    src, text_src, kind, rng = _planted(x, y, fraction, seed, ("shuffle", "near", "generic"))
    px = np.asarray(x[src], dtype=np.float32).copy()
    py = np.empty((len(src), y.shape[1]), np.float32)
    copied = text_src >= 0
    py[copied] = y[text_src[copied]]
    gen = np.nonzero(~copied)[0]
    ys = _unit(np.asarray(y, dtype=np.float32))
    mean = ys.mean(0)
    py[gen] = _unit(
        mean[None]
        + 0.05
        * rng.standard_normal((len(gen), y.shape[1]))
        / np.sqrt(y.shape[1])
        * np.linalg.norm(mean)
    )
    return px, py, kind


def probe_sources(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_probes`` as row positions, for inputs that are not embeddings (a model mode's
    feature caches): each probe's image row and caption row, and its kind, half ``shuffle``
    and half ``near``. Why no ``generic``: a planted caption there must be some real pair's
    encoder input, and a mean direction is none (token states have no mean caption)."""
    src, text_src, kind, _ = _planted(x, y, fraction, seed, ("shuffle", "near"))
    return src, text_src, kind


def _planted(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int, kinds: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.random.Generator]:
    """The probes' source rows, caption rows (-1: ``generic``, made by the caller), kinds
    (an equal share each, in the order given) and the generator that drew them."""
    rng = np.random.default_rng(seed)
    n = len(x)
    m = min(n, max(30, int(round(fraction * n))))
    src = rng.choice(n, m, replace=False)
    text_src = np.full(m, -1, dtype=np.int64)
    kind = np.empty(m, dtype=object)
    xs = _unit(np.asarray(x, dtype=np.float32))
    ys = _unit(np.asarray(y, dtype=np.float32))
    for rows, name in zip(np.array_split(np.arange(m), len(kinds)), kinds):
        kind[rows] = name
        if name == "shuffle":
            partner = src[rows][np.roll(np.arange(len(rows)), 1)]
            text_src[rows] = _other_caption(xs, ys, src[rows], partner, seed)
        elif name == "near":
            text_src[rows] = _nearest_other_caption(xs, ys, src[rows])
    # a caption no error could be planted from (none other was found) makes no probe
    copied = text_src >= 0
    own = np.zeros(m, dtype=bool)
    own[copied] = _no_error(xs, ys, src[copied], text_src[copied])
    return src[~own], text_src[~own], kind[~own], rng


def _no_error(xs: np.ndarray, ys: np.ndarray, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Whether each row paired with its other's caption plants no error: the two captions are
    one, or the two pictures are (COCO's five captions of one image; unit rows)."""
    same_text = np.einsum("ij,ij->i", ys[rows], ys[others]) >= SAME
    return same_text | (np.einsum("ij,ij->i", xs[rows], xs[others]) >= SAME)


def _other_caption(
    xs: np.ndarray, ys: np.ndarray, rows: np.ndarray, partner: np.ndarray, seed: int
) -> np.ndarray:
    """Each row's shuffled caption: its partner's, unless that plants no error (``_no_error``:
    web sets repeat captions, a class-caption set repeats one a class, COCO gives an image
    five), then a random pair's that does (the first of 64 drawn; the partner's when none
    does). Sets without repeats keep every partner: their probes are those planted before."""
    out = partner.copy()
    clash = np.flatnonzero(_no_error(xs, ys, rows, partner))
    if len(clash) == 0:
        return out
    rng = np.random.default_rng([seed, 17])
    for r in clash:
        draw = rng.choice(len(ys), 64)
        ok = draw[~_no_error(xs, ys, np.full(64, rows[r]), draw)]
        if len(ok):
            out[r] = ok[0]
    return out


def _nearest_other_caption(xs: np.ndarray, ys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each row, a near pair (by image, among the 64 nearest) of another picture with
    another caption (``_no_error`` false): the first beyond the ``CONSENSUS_K`` nearest such,
    else the furthest there is; the nearest pair when none is. Unit rows.
    Why not the nearest: the consensus (``knn_disagreement``) would find the copied caption
    among the probe's own image neighbours and read the probe as agreeing, which real
    near-miss noise (no copy of its caption beside it) is not; the twin then learnt to
    distrust the consensus (five captions an image, no validation pairs: aligned near-miss AP
    0.44 with the nearest, 0.49 with this; benchmarks/README.md, "Near-miss probes from
    beyond the consensus's neighbours")."""
    sim = xs[rows] @ xs.T
    sim[np.arange(len(rows)), rows] = -np.inf
    order = np.argsort(-sim, axis=1)[:, :64]
    out = np.empty(len(rows), dtype=np.int64)
    for r, i in enumerate(rows):
        ok = order[r][~_no_error(xs, ys, np.full(len(order[r]), i), order[r])]
        out[r] = ok[min(CONSENSUS_K, len(ok) - 1)] if len(ok) else order[r, 0]
    return out


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
    similarity on the trusted pairs (the validation set; without one, the training pairs it
    fits best: ``trimmed_scale``), so the head starts from logits as sharp as the data
    supports; "auto" pull: ``args.lam``.
    Why not a search: over 4 geometries x 5 noise kinds x 3 seeds, choosing the pull (or the
    scale) by validation loss or by how well planted probes are ranked gave the same AP as
    this rule within the noise (paired by seed, 95% intervals containing 0), and fitting six
    heads instead of one cost about 5.5x the seconds (benchmarks/bench_select.py,
    benchmarks/README.md).
    """
    args = args or SelectArgs()
    all_pairs = None
    if val is not None:
        t_cal = calibrated_scale(val.image, val.text, batch_size, seed, args.max_pairs)
        source = "validation pairs"
    else:
        all_pairs = calibrated_scale(train.image, train.text, batch_size, seed, args.max_pairs)
        t_cal = trimmed_scale(
            train.image,
            train.text,
            args.untrusted_drop,
            batch_size,
            seed,
            args.max_pairs,
            start=all_pairs,
        )
        source = f"{1 - args.untrusted_drop:.0%} of the training pairs it fits best"
    why = []
    if logit_scale == "auto":
        t = args.scale_factor * t_cal
        why.append(
            f"scale = {args.scale_factor:g} x {t_cal:.3g}, the temperature that calibrates "
            f"the pretrained similarity on the {source}"
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
    return HeadChoice(
        t, pull, calibrated_scale=t_cal, reason="; ".join(why), all_pairs_scale=all_pairs
    )
