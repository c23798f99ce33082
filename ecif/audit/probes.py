"""A twin audit with planted probes: labelled examples of misalignment on the user's own data.

The signals' mixture (``ecif.audit.combine``) needs no labels, but on weak signals it cannot
tell which signal carries the noise. The twin audit plants copies of real pairs with wrong
captions (``ecif.audit.selection.make_probes``: another pair's caption, the nearest image's
caption, a generic caption), runs the same fit and scoring with the same options and head
choice, and returns every row's signals with the probe mask; ``probe_weighted_score`` learns
from them how much each signal says. The twin is capped at ``max_rows`` sampled pairs (the
weights are a few numbers; a sample measures them as well as the whole set), so its cost is
at most one more audit of that size (``TWIN_MAX_ROWS``; ``MODEL_TWIN_MAX_ROWS`` in a model
mode). With a validation set the twin also holds half of its pairs (at most
``CLEAN_MAX_ROWS``) as known-clean rows, trained on like the real ones, and is validated against the other half (its ``trusted_loss`` head is fit on that half alone, so
the held pairs are as new to it as the real rows): the probes' weights are learnt against
those clean rows and corrected by the real rows against them (``combine.probe_weighted_score``).
Without one, the audit's own head fit on the validation pairs is reused. In a model mode the
encoders read features, so each probe is a real pair's image with another real pair's caption
(``selection.probe_sources``) and the twin reads the caches in place
(``model_signals.twin_features``). The audit's own head, scores and files are untouched.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ecif.audit.baselines import KnnConsensus, cosine
from ecif.audit.misalign import ProbeSignals, signal_suspicions
from ecif.audit.model_signals import twin_features
from ecif.audit.recorded import recording_warnings
from ecif.audit.selection import make_probes, probe_sources
from ecif.data.duplicates import image_groups
from ecif.data.embedding_set import EmbeddingSet
from ecif.device import resolve_device

MIN_PROBES = 30  # fewer planted probes than this: too few to weigh three signals
TWIN_MAX_ROWS = 20_000  # real pairs in the twin audit (a seeded sample of larger sets)
# the same in a model mode (params other than "head"), whose fits cost far more a row: at
# 10,000 pairs a 2,000-pair twin halved the projection mode's audit without a validation set
# (x1.8) and moved AP by at most 0.0022 a seed (benchmarks/README.md, "A smaller twin")
MODEL_TWIN_MAX_ROWS = 2_000
MIN_CLEAN = MIN_PROBES  # validation pairs the twin holds as clean rows: this many, or none
CLEAN_MAX_ROWS = 5_000  # at most this many (a few weights to learn; the twin stays small)
# the twin's warnings reach the audit's with this in front: its heads weigh the signals only
TWIN_PREFIX = "twin audit (weighs the signals, not the scores): "


def probe_signals(
    auditor: Any,
    fraction: float,
    max_rows: int | None = None,
    progress: bool = False,
    consensus: np.ndarray | None = None,
    near: KnnConsensus | None = None,
) -> ProbeSignals | None:
    """Run the twin audit of ``auditor``'s (an ``ecif.Auditor``) training set (a seeded sample
    of at most ``max_rows`` pairs; by default ``TWIN_MAX_ROWS``, or ``MODEL_TWIN_MAX_ROWS``
    in a model mode) plus ``fraction`` planted probes; None when that plants
    fewer than ``MIN_PROBES`` (a small set: the mixture alone decides); with a validation
    set, half of its pairs join as clean rows (``held_out_clean``). ``consensus``: the
    audit's ``knn_disagreement`` over its whole training set; a sampled twin takes it for its
    real rows and reads its probes' and clean rows' neighbours in the whole set (``sampled_consensus``), through
    ``near`` when given (the indexes behind ``consensus``) rather than indexes built again."""
    train = auditor.train
    if max_rows is None:
        max_rows = TWIN_MAX_ROWS if auditor.args.params == "head" else MODEL_TWIN_MAX_ROWS
    pool = auditor.distinct_rows()  # each pair once: the twin holds no copies
    if fraction <= 0 or round(fraction * min(len(pool), max_rows)) < MIN_PROBES:
        return None
    seed = auditor.args.seed
    rows = pool
    if len(pool) > max_rows:
        rows = pool[np.sort(np.random.default_rng(seed).choice(len(pool), max_rows, replace=False))]
    x, y = np.asarray(train.image)[rows], np.asarray(train.text)[rows]
    image_rows = text_rows = None
    if auditor.args.params == "head":
        px, py, kind = make_probes(x, y, fraction, seed)
    else:  # the encoders read features: probes must be copies of real rows
        image_rows, text_rows, kind = probe_sources(x, y, fraction, seed)
        px, py = x[image_rows], y[text_rows]
    held, twin_val = held_out_clean(auditor.val, seed)
    cx = np.asarray(auditor.val.image)[held] if held is not None else x[:0]
    cy = np.asarray(auditor.val.text)[held] if held is not None else y[:0]
    n = len(rows) + len(px) + len(cx)
    # no shard groups: the probes must share batches with real pairs, as noise does
    twin_set = EmbeddingSet(
        np.concatenate([x, px, cx]),
        np.concatenate([y, py, cy]),
        ids=np.arange(n),
        logit_scale=train.logit_scale,
    )
    with warnings.catch_warnings():  # the audit itself has said what its inputs lack
        warnings.simplefilter("ignore", UserWarning)
        features = twin_features(auditor, rows, image_rows, text_rows, held)
        twin = type(auditor)(twin_set, twin_val, auditor.args, **features)
    twin.choice = auditor.choose()  # the same head: only the planted and held rows differ
    if held is None:
        twin.trusted = auditor.trusted  # the same validation pairs: their head, not a refit
    if consensus is not None and len(rows) < len(pool):
        if near is None:
            device = resolve_device(auditor.args.device)
            whole = auditor.distinct_train()
            near = KnnConsensus(whole.image, whole.text, device=device)
        new_x, new_y = np.concatenate([px, cx]), np.concatenate([py, cy])
        twin.known_consensus = sampled_consensus(rows, consensus, near.of_queries(new_x, new_y))
    with recording_warnings(prefix=TWIN_PREFIX):  # said again, as the twin's
        scored = twin._signals(progress)
    scored["clip_score"] = cosine(twin_set.image, twin_set.text)
    n_norm = float(np.mean([h.n_norm for h in twin.heads]))
    position = np.arange(n)
    is_probe = (position >= len(rows)) & (position < len(rows) + len(px))
    is_clean = position >= len(rows) + len(px) if held is not None else None
    kinds = np.full(n, "", dtype=object)
    kinds[len(rows) : len(rows) + len(px)] = kind
    sus = signal_suspicions(scored, n_norm)
    return ProbeSignals(sus, is_probe, is_clean, kinds)


def held_out_clean(val: EmbeddingSet | None, seed: int) -> tuple[np.ndarray | None, Any]:
    """Which validation pairs the twin holds as clean rows (a seeded half, at most
    ``CLEAN_MAX_ROWS``; None when there are fewer than ``MIN_CLEAN``) and the validation
    set it is scored against (the rest; ``val`` itself when none are held). The pairs of one
    image go to one side: where an image has several captions (COCO's five), a held row
    whose image the trusted head saw under another caption would look cleaner than any
    training pair can, and the probes would learn to trust ``trusted_loss`` too much."""
    if val is None or len(val) // 2 < MIN_CLEAN:
        return None, val
    groups = image_groups(val.image)
    order = np.random.default_rng([seed, 5]).permutation(groups.max() + 1)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    rows = np.argsort(rank[groups], kind="stable")  # the rows, image by image, seeded order
    count = min(len(val) // 2, CLEAN_MAX_ROWS)
    upto = np.cumsum(np.bincount(groups)[order])  # rows held if the split ends after each image
    held = rows[: upto[upto <= count][-1]] if upto[0] <= count else rows[:0]
    if len(held) < MIN_CLEAN:
        return None, val
    return np.sort(held), val.subset(np.sort(rows[len(held) :]))


def sampled_consensus(rows: np.ndarray, consensus: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """A sampled twin's ``knn_disagreement``: its real rows (``rows`` of the training set) keep
    the audit's own values (``consensus``), and its probes take theirs over all of the
    training pairs (``probes``: ``KnnConsensus.of_queries``). Why: over the sample alone
    every pair's neighbours are further away (at 1M pairs, 50 times sparser) than over the
    whole set the audit reads, so the probes' weight for the signal would be learnt on
    values of another scale than the ones it weighs."""
    return np.concatenate([np.asarray(consensus, dtype=np.float64)[rows], probes])
