"""Validation pairs held in the twin audit as known-clean rows, against the twin without them.

For every cell-seed of ``bench_detect.py``'s grid: one audit with DEFAULT options (its twin
holds half of the validation pairs), recombined with the contrast's rule varied
(``probe_regression.CONTRAST_MIN_Z``: 0 = the penalty with the lowest held-out loss, inf = the
probes' direction never corrected), and the whole audit again without held pairs (the default
before them), both timed. Prints mean AP per variant and each variant minus the default before,
per seed and with a 95% interval over seeds.

    python benchmarks/bench_clean_rows.py --geometries clip_like aligned cone \\
        --kinds confusable mixed --class-skew 1.0
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
import pandas as pd
from bench_detect import make_sets
from scipy import stats
from trial_cells import add_grid_options, grid_rows

import ecif
from ecif.audit import probe_regression, probes
from ecif.audit.metrics import ranking_metrics
from ecif.audit.misalign import misalign_scores

BEFORE = "without held pairs (the default before)"
RULES_DEFAULT = "default (one standard error)"
RULES = {
    "default (one standard error)": None,
    "lowest held-out loss": 0.0,
    "never corrected": np.inf,
}


def one_cell(geometry: str, kind: str, seed: int, args) -> list[dict]:
    train, val, labels = make_sets(
        geometry, kind, args.noise, seed, args.n, args.n_val, args.d, args.class_skew
    )
    t0 = time.perf_counter()
    aud = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed))
    table = aud.run()
    seconds = time.perf_counter() - t0
    n_norm = float(np.mean([h.n_norm for h in aud.heads]))
    scores = {}
    for name, min_z in RULES.items():
        z = probe_regression.CONTRAST_MIN_Z if min_z is None else min_z
        with mock.patch.object(probe_regression, "CONTRAST_MIN_Z", z):
            scores[name] = misalign_scores(table, "auto", n_norm, aud.probes)[0]
    np.testing.assert_allclose(  # the default variant is the audit's own column
        scores["default (one standard error)"], table["misalign_score"], rtol=1e-5, atol=1e-5
    )
    t0 = time.perf_counter()
    with mock.patch.object(probes, "MIN_CLEAN", 10**12):  # a twin without held pairs
        before = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed)).run()
    seconds_before = time.perf_counter() - t0
    scores[BEFORE] = before["misalign_score"].to_numpy()
    scores["trusted_loss alone"] = table["trusted_loss"].to_numpy()
    return [
        {
            "geometry": geometry,
            "kind": kind,
            "seed": seed,
            "method": k,
            "seconds": seconds if k == RULES_DEFAULT else seconds_before if k == BEFORE else None,
            **ranking_metrics(labels, v),
        }
        for k, v in scores.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_options(ap)
    args = ap.parse_args()
    train, val, _ = make_sets("clip_like", "shuffle", 0.2, 0, 400, 100, args.d)
    ecif.Auditor(train, val, ecif.AuditArgs()).run()  # warm-up: the first audit pays start-up
    t0 = time.time()
    df = pd.DataFrame(grid_rows(args, one_cell))
    cells = df.groupby(["geometry", "kind", "method"], sort=False)["ap"].mean().unstack()
    print(cells.round(3).to_string())
    per_seed = df.groupby(["seed", "method"])["ap"].mean().unstack()
    print("\n| variant | mean AP | minus the default before, per seed | 95% interval |")
    print("|---|---|---|---|")
    for name in per_seed.columns:
        d = per_seed[name] - per_seed[BEFORE]
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0
        print(
            f"| {name} | {per_seed[name].mean():.4f} | "
            + ", ".join(f"{v:+.4f}" for v in d)
            + f" | [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] |"
        )
    secs = df.groupby("method")["seconds"].sum()
    print(
        f"\nwhole audits, same process: {secs[RULES_DEFAULT]:.1f} s with held pairs against "
        f"{secs[BEFORE]:.1f} s without (x{secs[RULES_DEFAULT] / secs[BEFORE]:.2f})"
    )
    print(f"{len(df) // len(per_seed.columns)} cell-seeds, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
