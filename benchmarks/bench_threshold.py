"""The automatic threshold on the detection grid: how many pairs it flags against the true
noise count, and whether it calls its estimate reliable: the shipped rule and the three before it.

    python benchmarks/bench_threshold.py --cache /tmp/trials-d64
    python benchmarks/bench_threshold.py --cache /tmp/trials-n05t --geometries shapes digits --noise 0.05

Reads (and fills) the same per-cell cache as ``bench_combine_trials.py``: every cell audited
once with DEFAULT options. ``shipped``: ``misalign_scores``' noise rate, which checks the
mixture's count against the planted probes' spike-in count (``spike_in_rate``), trusts it
only where the mixture's density dips by ``MIN_CHECKED_VALLEY`` between its groups, and
otherwise flags the top 10% (``FALLBACK_FRACTION``) or, when more, as many as score like the
shuffled-caption probes (``NoiseRate.fallback_fraction``), and a count over 1.5x the one the
final score's own two groups hold is not trusted either (``checked_by_score``); ``before the
score check``: the same without that last check (the rule before 2026-12-08, twenty-seventh
session); ``before the valley floor``: the
same check without that floor, 10% when untrusted (the rule before 2026-12-07, twenty-fifth
session); ``without the probe check``: the mixture's own test (at most 30%, no comparison),
the rule before that, 10% when untrusted. Printed
per cell: flagged / true (mean [min, max] over seeds) and how many seeds trusted the rate;
then per rule, over the whole grid, the trusted count and the range of flagged / true where
trusted; then the counts as fractions of the set (they work at 0% noise too, where a ratio
does not): flagged, the probes' count, and a test of whether the set holds any noise at all,
the AUC of the twin's real rows over the validation pairs it holds, ranked by the mixture's
log-odds, in standard errors from 0.5 (caches with held pairs only).

    python benchmarks/bench_threshold.py --cache /tmp/trials-n00 --kinds mixed --noise 0.0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from bench_detect import markdown
from trial_cells import Cell, add_grid_arguments, cached_cells

from ecif.audit.metrics import ranking_metrics
from ecif.audit.misalign import misalign_scores, mixture_ranking
from ecif.audit.thresholds import (
    FALLBACK_FRACTION,
    MIN_CHECKED_VALLEY,
    checked_by_score,
    mixture_noise_rate,
)


def rates(cell: Cell) -> dict[str, tuple[float, bool, float | None]]:
    """(share flagged, trusted, probe rate) under the shipped rule and the three before it."""
    score, record, rate = misalign_scores(
        cell.table, "auto", float(cell.d["n_norm"]), cell.probes()
    )
    if not np.allclose(score, cell.d["shipped"], equal_nan=True):
        raise SystemExit("the cache no longer matches the shipped score: delete it and rerun")
    checked = checked_by_score(rate, score)
    valley = record["valley"]
    # the rule before the valley floor: any valley above 0 (lifting one under the floor to it
    # changes no other test: those read valley > 0 and valley >= CLEAR_VALLEY), 10% fallback
    lifted = max(valley, MIN_CHECKED_VALLEY) if valley > 0 else valley
    floorless = mixture_noise_rate(cell.log_odds, cell.mix.separation, lifted, record["probe_rate"])
    before = mixture_noise_rate(cell.log_odds, cell.mix.separation, valley)
    return {
        "shipped": (checked.rate if checked.reliable else checked.fallback_fraction(),
                    checked.reliable, checked.probe_rate),
        "before the score check": (rate.rate if rate.reliable else rate.fallback_fraction(),
                                   rate.reliable, rate.probe_rate),
        "before the valley floor": (floorless.rate if floorless.reliable else FALLBACK_FRACTION,
                                    floorless.reliable, floorless.probe_rate),
        "without the probe check": (before.rate if before.reliable else FALLBACK_FRACTION,
                                    before.reliable, None),
    }  # fmt: skip


def held_auc_z(cell: Cell) -> float:
    """(AUC - 1/2) / its standard error under no difference, of the twin's real rows over
    its held validation pairs, ranked by the mixture's log-odds (NaN: no held pairs)."""
    if cell.is_clean is None:
        return np.nan
    score = mixture_ranking(cell.mix, cell.twin)
    clean = np.asarray(cell.is_clean, dtype=bool)
    ok = np.isfinite(score)
    real, held = ok & ~clean & ~cell.is_probe, ok & clean
    n1, n2 = int(real.sum()), int(held.sum())
    both = real | held
    auc = ranking_metrics(real[both], score[both])["auroc"]
    return float((auc - 0.5) / np.sqrt((n1 + n2 + 1) / (12 * n1 * n2)))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_grid_arguments(ap)
    args = ap.parse_args()
    t0, rows = time.time(), []
    for geometry, kind, seed, _, cell in cached_cells(args):
        true = float(cell.d["labels"].mean())
        z = held_auc_z(cell)
        for rule, (rate, ok, probe) in rates(cell).items():
            flagged = rate
            probe = np.nan if probe is None else probe
            ratio, probe_ratio = (flagged / true, probe / true) if true > 0 else (np.nan, np.nan)
            rows.append(
                dict(geometry=geometry, kind=kind, seed=seed, rule=rule, trusted=ok, true=true,
                     flagged=flagged, probe_count=probe, ratio=ratio, probe=probe_ratio,
                     held_z=z)
            )  # fmt: skip
    df = pd.DataFrame(rows)
    cells = df.groupby(["geometry", "kind", "rule"], sort=False).agg(
        ratio=("ratio", "mean"), lo=("ratio", "min"), hi=("ratio", "max"),
        trusted=("trusted", "sum"), seeds=("trusted", "size"), probe=("probe", "mean"),
    )  # fmt: skip
    cells["flagged / true"] = [
        f"{m:.2f} [{a:.2f}, {b:.2f}] ({t}/{s} trusted)"
        for m, a, b, t, s in zip(cells.ratio, cells.lo, cells.hi, cells.trusted, cells.seeds)
    ]
    wide = cells["flagged / true"].unstack("rule").reset_index()
    probe = cells.xs("shipped", level="rule")["probe"].round(2).to_numpy()
    print("\n## Flagged / true noise count (mean [min, max] over seeds; seeds trusted)\n")
    print(markdown(wide.assign(**{"probes' count / true": probe})))
    print()
    for rule, sub in df.groupby("rule", sort=False):
        tr = sub[sub.trusted]
        span = f"{tr.ratio.min():.2f}-{tr.ratio.max():.2f}" if len(tr) else "-"
        over = int((tr.ratio > 1.5).sum())
        print(
            f"- {rule}: trusted on {len(tr)} of {len(sub)} cell-seeds, flagged / true {span} "
            f"where trusted ({over} over 1.5); all cell-seeds: mean |log(flagged / true)| "
            f"{np.nanmean(np.abs(np.log(sub.ratio))):.3f}"
        )
    shipped = df[df.rule == "shipped"].groupby(["geometry", "kind"], sort=False)
    counts = shipped.agg(
        noise=("true", "mean"), flagged=("flagged", "mean"), p=("probe_count", "mean"),
        p_lo=("probe_count", "min"), p_hi=("probe_count", "max"), z=("held_z", "mean"),
        z_lo=("held_z", "min"), z_hi=("held_z", "max"),
    )  # fmt: skip
    table = pd.DataFrame({
        "noise": counts.noise.map("{:.1%}".format),
        "flagged (mean)": counts.flagged.map("{:.1%}".format),
        "probes' count (mean [min, max])": [
            f"{m:.1%} [{a:.1%}, {b:.1%}]" for m, a, b in zip(counts.p, counts.p_lo, counts.p_hi)
        ],
        "held-pairs AUC, z (mean [min, max])": [
            f"{m:+.2f} [{a:+.2f}, {b:+.2f}]" for m, a, b in zip(counts.z, counts.z_lo, counts.z_hi)
        ],
    }).reset_index()  # fmt: skip
    print("\n## Counts as fractions of the set (shipped rule)\n")
    print(markdown(table))
    print(f"\n{len(df)} rows, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
