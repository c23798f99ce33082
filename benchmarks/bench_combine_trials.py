"""Trials of other ways to weigh the signals into ``misalign_score``, on cached audits.

    python benchmarks/bench_combine_trials.py --cache /tmp/trials-d64
    python benchmarks/bench_combine_trials.py --cache /tmp/trials-n10 --geometries clip_like aligned --noise 0.1
    python benchmarks/bench_combine_trials.py --cache /tmp/trials-noval-n10 --no-val --geometries clip_like aligned --noise 0.1 --trials default "before: untrusted mixture kept, probes fit once"

Each cell of ``bench_detect.py``'s grid (same data, same seeds) is audited once with DEFAULT
options; its three signals, its twin audit's signals and probe mask, and negCLIPLoss on both
sets are saved to ``--cache`` (one .npz per cell-seed, reused on the next run). Every trial
then recombines those signals, so a new idea costs seconds per grid, not an audit per cell.
``default`` recomputes the shipped ``misalign_scores`` from the cache (it must match the
audit's own column: the script checks). Printed: mean AP per cell and trial, and per trial
its difference from the default per seed with a 95% interval over seeds (bench_detect's
``paired``). A trial is a function of one cached cell that returns a score (larger = more
suspect); add one to ``TRIALS``. The cache keeps which twin rows are validation pairs held as
clean rows (``Cell.is_clean``; caches from before them have none): the trials that go through
``misalign_scores`` use them as the audit does, the older ones that refit the probes'
direction themselves count them among the real rows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time

import numpy as np
import pandas as pd
from bench_detect import markdown, paired, summarise
from mixture_trials import MIXTURE_TRIALS
from trial_cells import Cell, add_grid_arguments, cached_cells

from ecif.audit import combine, misalign, probe_regression
from ecif.audit.combine import CONSENSUS
from ecif.audit.metrics import ranking_metrics
from ecif.audit.misalign import misalign_scores
from ecif.audit.thresholds import mixture_noise_rate


def _twin_score(cell: Cell, feats: np.ndarray, w: np.ndarray) -> np.ndarray:
    lin = feats @ w
    if cell.one_mode:
        return combine.Standardiser.of(lin)(lin)
    lo = cell.mix.log_odds(cell.twin)
    return combine.Standardiser.of(lo)(lo) + combine.Standardiser.of(lin)(lin)


def pu_cleaned(cell: Cell, drop: float | None = 0.2) -> np.ndarray:
    """Probe weights refit after dropping the real twin rows the first fit's score ranks most
    suspect (``drop``: that fraction; None: the mixture's rate, and nothing when it is not
    trusted): the twin's own noisy rows, labelled 'rest', pull the weights off real noise."""
    feats = cell.mix.features(cell.twin)
    w, _ = probe_regression.probe_direction(feats, cell.is_probe)
    q = drop if drop is not None else (cell.rate.rate if cell.rate.reliable else 0.0)
    if q > 0 and not (drop is None and cell.one_mode):
        s = _twin_score(cell, feats, w)
        keep = cell.is_probe | (s < np.quantile(s[~cell.is_probe], 1 - q))
        w, _ = probe_regression.probe_direction(feats[keep], cell.is_probe[keep])
    return cell.finish(cell.mix.features(cell.sus) @ w)


def reweighted(cell: Cell, l2: float = 1e-2, part: float = 1.0) -> np.ndarray:
    """The default with another L2 penalty on the probes' regression (``l2``, shipped 1e-2)
    or another weight on its part of the sum (``part``, shipped 1): is the default placed
    on one grid's optimum?"""
    w, _ = probe_regression.probe_direction(cell.mix.features(cell.twin), cell.is_probe, l2=l2)
    lin = cell.mix.features(cell.sus) @ w  # one mode: the probes' part alone, so x part = x 1
    return cell.finish(lin) + (part - 1.0) * combine.Standardiser.of(lin)(lin)


def pu_true_labels(cell: Cell) -> np.ndarray:
    """The bound for ``pu_cleaned``: drop exactly the truly noisy real rows (labels no user
    has; the twin's real rows are the training pairs, in order, below its row cap)."""
    feats = cell.mix.features(cell.twin)
    noisy = np.r_[cell.d["labels"], np.zeros(int(cell.is_probe.sum()), dtype=bool)]
    w, _ = probe_regression.probe_direction(feats[~noisy], cell.is_probe[~noisy])
    return cell.finish(cell.mix.features(cell.sus) @ w)


def soft_targets(cell: Cell) -> np.ndarray:
    """Probes as positives and every real twin row with the mixture's posterior as its
    target, so the weights also learn the noise this set has."""
    feats = cell.mix.features(cell.twin)
    post = 0.0 if cell.one_mode else 0.5 * (1 + np.tanh(0.5 * cell.mix.log_odds(cell.twin)))
    target = np.where(cell.is_probe, 1.0, post)
    w, _ = probe_regression.probe_direction(feats, target)
    return cell.finish(cell.mix.features(cell.sus) @ w)


def negclip_feature(cell: Cell) -> np.ndarray:
    """negCLIPLoss as a fourth feature of the probe regression (not of the mixture)."""
    st = combine.Standardiser.of(cell.d["negclip"])
    c = combine.gaussian_tail_scale(st(cell.d["negclip"]))

    def feature(v: np.ndarray) -> np.ndarray:  # as the mixture's features: robust z, tails
        return st(v) if not np.isfinite(c) else c * np.arcsinh(st(v) / c)

    main = np.column_stack([cell.mix.features(cell.sus), feature(cell.d["negclip"])])
    twin = np.column_stack([cell.mix.features(cell.twin), feature(cell.d["twin_negclip"])])
    w, _ = probe_regression.probe_direction(twin, cell.is_probe)
    return cell.finish(main @ w)


def negclip_in_clip_slot(cell: Cell) -> np.ndarray:
    """negCLIPLoss (the model's scale) in place of clip_score, in the mixture and the probes:
    the shipped combination on that column (a suspicion, so the cosine's slot takes it
    negated)."""
    table = cell.table.assign(clip_score=-cell.d["negclip"].astype(np.float64))
    twin = {**cell.twin, "clip_score": cell.d["twin_negclip"].astype(np.float64)}
    return misalign_scores(table, "auto", float(cell.d["n_norm"]), cell.probes(twin))[0]


def stacked(cell: Cell, only_hedged: bool = False) -> np.ndarray:
    """The mixture's score (hedged where the default hedges it) as one more feature of the
    probes' regression, so the probes weigh it against the signals instead of the fixed equal
    sum; a one-mode mixture (or, ``only_hedged``, a trusted one) keeps the default."""
    if cell.one_mode or (only_hedged and cell.rate.reliable):
        return shipped(cell)
    twin_base = cell.mixture_score(cell.twin)

    def with_base(features: np.ndarray, base: np.ndarray) -> np.ndarray:
        return np.column_stack([features, combine.Standardiser.of(base)(base)])

    w, _ = probe_regression.probe_direction(
        with_base(cell.mix.features(cell.twin), twin_base), cell.is_probe
    )
    return with_base(cell.mix.features(cell.sus), cell.base) @ w


def losses_pooled(cell: Cell, tie: bool) -> np.ndarray:
    """The probes' weight on ``pair_loss`` given to ``trusted_loss`` (or, ``tie``, the two
    weights averaged): on planted single copies the two losses say the same, and only the
    validation-fit one cannot have learned a swap that recurs in the training set."""
    signals = list(cell.mix.signals)
    if "trusted_loss" not in signals:
        return shipped(cell)
    w, _ = probe_regression.probe_direction(cell.mix.features(cell.twin), cell.is_probe)
    i, j = signals.index("pair_loss"), signals.index("trusted_loss")
    total = w[i] + w[j]
    w[i], w[j] = (total / 2, total / 2) if tie else (0.0, total)
    return cell.finish(cell.mix.features(cell.sus) @ w)


def shipped(cell: Cell, probes: bool = True) -> np.ndarray:
    """The shipped combination (``misalign_scores``), with or without the twin's probes."""
    twin = cell.probes() if probes else None
    return misalign_scores(cell.table, "auto", float(cell.d["n_norm"]), twin)[0]


def without(cell: Cell, *signals: str) -> np.ndarray:
    """The default without ``signals`` in the audit's table and its twin's."""
    table = cell.table.drop(columns=list(signals), errors="ignore")
    twin = cell.probes({k: v for k, v in cell.twin.items() if k not in signals})
    return misalign_scores(table, "auto", float(cell.d["n_norm"]), twin)[0]


def without_trusted_loss(cell: Cell) -> np.ndarray:
    """The default before ``trusted_loss`` joined the signals (three signals, same twin)."""
    return without(cell, "trusted_loss", CONSENSUS)


def without_consensus(cell: Cell) -> np.ndarray:
    """The default before the kNN consensus joined the signals (four, same twin)."""
    return without(cell, CONSENSUS)


@contextlib.contextmanager
def _tail_scale(scale):
    """``combine.gaussian_tail_scale`` replaced by ``scale`` for the duration of a trial."""
    shipped_scale = combine.gaussian_tail_scale
    combine.gaussian_tail_scale = scale
    try:
        yield
    finally:
        combine.gaussian_tail_scale = shipped_scale


@contextlib.contextmanager
def _count_trust():
    """The mixture's split trusted for the ranking by its count alone (the default before the
    clear-valley rule, ``misalign.split_trusted``)."""
    shipped_rule = misalign.split_trusted
    misalign.split_trusted = lambda rate, separation, valley: rate.reliable
    try:
        yield
    finally:
        misalign.split_trusted = shipped_rule


def count_trust(trial):
    """``trial`` with the split trusted by its count alone."""

    def run(cell: Cell) -> np.ndarray:
        with _count_trust():
            return trial(cell)

    return run


def signed(trial):
    """``trial`` as it was measured before 2026-12-03 (fourth session): probe weights of either
    sign, and the split trusted by its count alone. Every trial recorded before then keeps
    its figures."""

    def run(cell: Cell) -> np.ndarray:
        bounded = probe_regression.probe_direction
        probe_regression.probe_direction = functools.partial(bounded, nonnegative=False)
        try:
            with _count_trust():
                return trial(cell)
        finally:
            probe_regression.probe_direction = bounded

    return run


def tail_floor(cell: Cell, floor: float) -> np.ndarray:
    """The shipped combination with the tail transform's scale floored at ``floor`` (shipped
    0.5; 0.05 was the bisection's bound before the floor, so it is the default before it)."""
    with _tail_scale(functools.partial(combine.gaussian_tail_scale, floor=floor)):
        return shipped(cell)


def untransformed(cell: Cell, mixture_only: bool) -> np.ndarray:
    """No tail transform (c = inf: the robust z as they are) in the mixture and the probes'
    regression, or in the mixture only (the regression on the shipped features)."""
    with _tail_scale(lambda z, *args, **kwargs: float("inf")):
        if not mixture_only:
            return shipped(cell)
        raw = Cell(cell.d)
    w, _ = probe_regression.probe_direction(cell.mix.features(cell.twin), cell.is_probe)
    return raw.finish(cell.mix.features(cell.sus) @ w)


def before_unvalidated_rules(cell: Cell) -> np.ndarray:
    """The default before its two rules for audits without a validation set: the probes'
    regression fit once on every twin row, and an untrusted mixture kept (hedged) beside it.
    With a validation set it is the default. That is ``reweighted`` at its shipped constants,
    which recombines the probes' single fit with the mixture's score as the default did."""
    return reweighted(cell)


def unvalidated_drop(cell: Cell, drop: float) -> np.ndarray:
    """The default with another fraction of real twin rows left out of the probes' refit
    without a validation set (shipped ``UNVALIDATED_DROP``, 0.2); with one it is the default."""
    shipped_drop = misalign.UNVALIDATED_DROP
    misalign.UNVALIDATED_DROP = drop
    try:
        return shipped(cell)
    finally:
        misalign.UNVALIDATED_DROP = shipped_drop


def one_mode_kept(cell: Cell) -> np.ndarray:
    """The default, except that a one-mode mixture's log-odds is kept beside the probes'
    weighted features, z(log-odds) + z(F w), rather than left out (``probes_alone``'s "one
    mode", and without a validation set its "split not trusted" for such a mixture)."""
    score, record, _ = misalign_scores(cell.table, "auto", float(cell.d["n_norm"]), cell.probes())
    if not cell.one_mode or "probe_weights" not in record:
        return score
    lin = cell.mix.features(cell.sus) @ np.asarray(record["probe_weights"]["weights"])
    z = combine.Standardiser
    return z.of(cell.log_odds)(cell.log_odds) + z.of(lin)(lin)


def consensus_in_probes_only(cell: Cell, left_out: tuple[str, ...] = (CONSENSUS,)) -> np.ndarray:
    """Without a validation set: the mixture over the signals less ``left_out`` (its count,
    trust, hedge and one-mode rules as shipped), the probes' weights over all of them (the
    features of the shipped mixture's standardisers). ``left_out=()`` is the default (the
    script's check of this replica). With a validation set: the default."""
    if cell.is_clean is not None or not all(k in cell.sus for k in left_out):
        return shipped(cell)
    n_norm = float(cell.d["n_norm"])
    sus = misalign.signal_suspicions(cell.table.drop(columns=list(left_out)), n_norm)
    mix = combine.fit_mixture(sus)
    record = mix.record()
    score = mix.log_odds(sus)
    rate = mixture_noise_rate(score, mix.separation, record["valley"])
    unvalidated = misalign.self_influence_slot(cell.table)
    trusted = misalign.split_trusted(rate, mix.separation, record["valley"])
    alone = misalign.probes_alone(record["valley"], trusted, unvalidated)
    if not trusted and not alone:
        score = combine.hedged_score(mix, sus, score)[0]
    twin = cell.mix.features(cell.twin)
    ok = np.isfinite(twin).all(axis=1)
    drop = misalign.UNVALIDATED_DROP if unvalidated else 0.0
    w, _, _ = probe_regression.cleaned_probe_direction(twin[ok], cell.is_probe[ok], drop)
    return combine.probe_sum(score, cell.mix.features(cell.sus) @ w, bool(alone))[0]


TRIALS = {
    "default": shipped,
    "no validation set: the consensus in the probes' weights only": consensus_in_probes_only,
    "(check: the replica above with every signal in the mixture)": lambda c: (
        consensus_in_probes_only(c, ())
    ),
    "one mode: its log-odds kept beside the probes": one_mode_kept,
    "before both: signed weights, split trusted by its count": signed(shipped),
    "split trusted by its count (the default before the clear valley)": count_trust(shipped),
    "no validation set: drop 10%": signed(lambda c: unvalidated_drop(c, 0.1)),
    "no validation set: drop 30%": signed(lambda c: unvalidated_drop(c, 0.3)),
    "before: untrusted mixture kept, probes fit once": signed(before_unvalidated_rules),
    "without trusted_loss (the default before it)": signed(without_trusted_loss),
    "without knn_disagreement (the default before it)": without_consensus,
    "mixture alone (probes=0)": lambda c: shipped(c, probes=False),
    "PU-cleaned probes, drop 20%": signed(pu_cleaned),
    "PU-cleaned probes, drop the mixture's rate": signed(lambda c: pu_cleaned(c, None)),
    "PU-cleaned with the true labels (a bound)": signed(pu_true_labels),
    "soft targets from the mixture": signed(soft_targets),
    "negCLIPLoss as a 4th probe feature": signed(negclip_feature),
    "negCLIPLoss in the clip_score slot": signed(negclip_in_clip_slot),
    "probe penalty 1e-3": signed(lambda c: reweighted(c, l2=1e-3)),
    "probe penalty 0.1": signed(lambda c: reweighted(c, l2=0.1)),
    "probe part x0.5": signed(lambda c: reweighted(c, part=0.5)),
    "probe part x2": signed(lambda c: reweighted(c, part=2.0)),
    "pair_loss alone": lambda c: c.d["pair_loss"],
    "mixture's score as a probe feature": signed(stacked),
    "mixture's score as a probe feature, hedged cells only": signed(lambda c: stacked(c, True)),
    "pair_loss's probe weight moved to trusted_loss": signed(lambda c: losses_pooled(c, tie=False)),
    "the two losses' probe weights tied": signed(lambda c: losses_pooled(c, tie=True)),
    "tail scale without its floor (the default before it)": signed(lambda c: tail_floor(c, 0.05)),
    "tail scale floor 1": signed(lambda c: tail_floor(c, 1.0)),
    "tail scale floor 2": signed(lambda c: tail_floor(c, 2.0)),
    "no tail transform": signed(lambda c: untransformed(c, mixture_only=False)),
    "no tail transform in the mixture": signed(lambda c: untransformed(c, mixture_only=True)),
    **MIXTURE_TRIALS,
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_grid_arguments(ap)
    ap.add_argument("--trials", nargs="+", default=list(TRIALS), choices=list(TRIALS))
    args = ap.parse_args()
    t0, rows = time.time(), []
    for geometry, kind, seed, path, cell in cached_cells(args):
        for name in ["default", *[t for t in args.trials if t != "default"]]:
            score = TRIALS[name](cell)
            if name == "default" and not np.allclose(score, cell.d["shipped"], equal_nan=True):
                raise SystemExit(f"{path}: the cache no longer matches the shipped score")
            ap_ = ranking_metrics(cell.d["labels"], score)["ap"]
            rows.append(dict(geometry=geometry, kind=kind, seed=seed, method=name, ap=ap_))
    det = pd.DataFrame(rows)
    table = summarise(det, ["geometry", "kind", "method"], ["ap"])
    wide = table.pivot_table(
        index=["geometry", "kind"], columns="method", values="ap", aggfunc="first"
    )
    wide = wide[["default", *[t for t in args.trials if t != "default"]]].reset_index()
    print("\n## Average precision (mean [min, max] over seeds)\n")
    print(markdown(wide))
    print()
    for name in args.trials:
        if name != "default":
            print("- " + paired(det, name, "default"))
    print(f"\n{len(det)} rows, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
