"""The automatic threshold on the detection grid: how many pairs it flags against the true
noise count, and whether it calls its estimate reliable, with and without the probe check.

    python benchmarks/bench_threshold.py --cache /tmp/trials-d64
    python benchmarks/bench_threshold.py --cache /tmp/trials-n05t --geometries shapes digits --noise 0.05

Reads (and fills) the same per-cell cache as ``bench_combine_trials.py``: every cell audited
once with DEFAULT options. ``shipped``: ``misalign_scores``' noise rate, which checks the
mixture's count against the planted probes' spike-in count (``spike_in_rate``);
``without the probe check``: the mixture's own test (at most 30%, no comparison), the rule
before. Untrusted rates flag the top 10% (``FALLBACK_FRACTION``), as the audit does. Printed
per cell: flagged / true (mean [min, max] over seeds) and how many seeds trusted the rate;
then per rule, over the whole grid, the trusted count and the range of flagged / true where
trusted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from bench_detect import markdown
from trial_cells import Cell, add_grid_arguments, cached_cells

from ecif.audit.misalign import misalign_scores
from ecif.audit.thresholds import FALLBACK_FRACTION, mixture_noise_rate


def rates(cell: Cell) -> dict[str, tuple[float, bool, float | None]]:
    """(rate, reliable, probe rate) under the shipped rule and the rule before it."""
    score, record, rate = misalign_scores(
        cell.table, "auto", float(cell.d["n_norm"]), cell.probes()
    )
    if not np.allclose(score, cell.d["shipped"], equal_nan=True):
        raise SystemExit("the cache no longer matches the shipped score: delete it and rerun")
    before = mixture_noise_rate(cell.log_odds, cell.mix.separation, record["valley"])
    return {
        "shipped": (rate.rate, rate.reliable, rate.probe_rate),
        "without the probe check": (before.rate, before.reliable, None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_grid_arguments(ap)
    args = ap.parse_args()
    t0, rows = time.time(), []
    for geometry, kind, seed, _, cell in cached_cells(args):
        true = float(cell.d["labels"].mean())
        for rule, (rate, ok, probe) in rates(cell).items():
            flagged = rate if ok else FALLBACK_FRACTION
            rows.append(
                dict(geometry=geometry, kind=kind, seed=seed, rule=rule, trusted=ok,
                     ratio=flagged / true, probe=np.nan if probe is None else probe / true)
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
            f"{np.abs(np.log(sub.ratio)).mean():.3f}"
        )
    print(f"\n{len(df)} rows, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
