"""A twin audit with planted probes: labelled examples of misalignment on the user's own data.

The signals' mixture (``ecif.audit.combine``) needs no labels, but on weak signals it cannot
tell which signal carries the noise. The twin audit plants copies of real pairs with wrong
captions (``ecif.audit.selection.make_probes``: another pair's caption, the nearest image's
caption, a generic caption), runs the same fit and scoring with the same options and head
choice, and returns every row's signals with the probe mask; ``probe_weighted_score`` learns
from them how much each signal says. The twin is capped at ``max_rows`` sampled pairs (the
weights are a few numbers; a sample measures them as well as the whole set), so its cost is
at most one more audit of that size; the head fit on the validation pairs alone
(``trusted_loss``) is the audit's own, not fit again. The audit's own head, scores and
files are untouched.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ecif.audit.baselines import KnnConsensus, cosine
from ecif.audit.misalign import ProbeSignals, signal_suspicions
from ecif.audit.selection import make_probes
from ecif.data.embedding_set import EmbeddingSet
from ecif.device import resolve_device

MIN_PROBES = 30  # fewer planted probes than this: too few to weigh three signals
TWIN_MAX_ROWS = 20_000  # real pairs in the twin audit (a seeded sample of larger sets)


def probe_signals(
    auditor: Any,
    fraction: float,
    max_rows: int = TWIN_MAX_ROWS,
    progress: bool = False,
    consensus: np.ndarray | None = None,
    near: KnnConsensus | None = None,
) -> ProbeSignals | None:
    """Run the twin audit of ``auditor``'s (an ``ecif.Auditor``) training set (a seeded sample
    of at most ``max_rows`` pairs) plus ``fraction`` planted probes; None when that plants
    fewer than ``MIN_PROBES`` (a small set: the mixture alone decides). ``consensus``: the
    audit's ``knn_disagreement`` over its whole training set; a sampled twin takes it for its
    real rows and reads its probes' neighbours in the whole set (``sampled_consensus``), through
    ``near`` when given (the indexes behind ``consensus``) rather than indexes built again."""
    train = auditor.train
    if fraction <= 0 or round(fraction * min(len(train), max_rows)) < MIN_PROBES:
        return None
    seed = auditor.args.seed
    rows = np.arange(len(train))
    if len(train) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(train), max_rows, replace=False))
    x, y = np.asarray(train.image)[rows], np.asarray(train.text)[rows]
    px, py, _ = make_probes(x, y, fraction, seed)
    n = len(rows) + len(px)
    # no shard groups: the probes must share batches with real pairs, as noise does
    twin_set = EmbeddingSet(
        np.concatenate([x, px]),
        np.concatenate([y, py]),
        ids=np.arange(n),
        logit_scale=train.logit_scale,
    )
    with warnings.catch_warnings():  # the audit itself has said what its inputs lack
        warnings.simplefilter("ignore", UserWarning)
        twin = type(auditor)(twin_set, auditor.val, auditor.args)
    twin.choice = auditor.choose()  # the same head: only the planted rows differ
    twin.trusted = auditor.trusted  # the same validation pairs: their head, not a refit
    if consensus is not None and len(rows) < len(train):
        if near is None:
            device = resolve_device(auditor.args.device)
            near = KnnConsensus(train.image, train.text, device=device)
        twin.known_consensus = sampled_consensus(rows, consensus, near.of_queries(px, py))
    scored = twin._signals(progress)
    scored["clip_score"] = cosine(twin_set.image, twin_set.text)
    n_norm = float(np.mean([h.n_norm for h in twin.heads]))
    is_probe = np.arange(n) >= len(rows)
    return ProbeSignals(signal_suspicions(scored, n_norm), is_probe)


def sampled_consensus(rows: np.ndarray, consensus: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """A sampled twin's ``knn_disagreement``: its real rows (``rows`` of the training set) keep
    the audit's own values (``consensus``), and its probes take theirs over all of the
    training pairs (``probes``: ``KnnConsensus.of_queries``). Why: over the sample alone
    every pair's neighbours are further away (at 1M pairs, 50 times sparser) than over the
    whole set the audit reads, so the probes' weight for the signal would be learnt on
    values of another scale than the ones it weighs."""
    return np.concatenate([np.asarray(consensus, dtype=np.float64)[rows], probes])
