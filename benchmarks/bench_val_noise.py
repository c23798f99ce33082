"""A noisy validation set: does the audit's estimate of its noise find it, and does it warn?

    python benchmarks/bench_val_noise.py                 # 4 geometries x 4 kinds x 3 shares x 2 seeds
    python benchmarks/bench_val_noise.py --geometries clip_like --kinds shuffle --seeds 1

Every cell plants 20% noise of one kind in 2,000 training pairs and a share (``--val-noise``)
of the same kind in 500 validation pairs (a user who cut the validation set from the same web
data), and runs ``ecif.Auditor(train, val).run()`` with default options. The twin audit holds
half of the validation pairs; the script prints the planted share among those held pairs, the
audit's estimate (``combination["validation_noise"]``), how often it warned
(``NoisyValidationWarning``) and the default ``misalign_score``'s AP against the training
noise. Mean and [min, max] over seeds.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
from bench_detect import make_sets, markdown

import ecif
from ecif.audit.metrics import average_precision
from ecif.audit.probes import held_out_clean
from ecif.audit.validation_noise import NoisyValidationWarning


def one_cell(geometry: str, kind: str, share: float, seed: int, args) -> dict:
    train, val, labels = make_sets(
        geometry, kind, 0.2, seed, args.n, args.n_val, args.d, val_noise=share
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoisyValidationWarning)
        table = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed)).run()
    found = table.attrs["combination"].get("validation_noise") or {}
    held, _ = held_out_clean(val, seed)
    planted = val.metadata["is_corrupted"].to_numpy()
    return {
        "geometry": geometry,
        "kind": kind,
        "val_noise": share,
        "seed": seed,
        "planted_held": float(planted[held].mean()),
        "estimate": found.get("rate", np.nan),
        "low": (found.get("interval") or [np.nan])[0],
        "warned": any(w.category is NoisyValidationWarning for w in caught),
        "training_over_validation": found.get("training_over_validation_auroc", np.nan),
        "probe_rate": table.attrs["combination"].get("probe_rate", np.nan),
        "ap": average_precision(labels, table["misalign_score"].to_numpy()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--geometries", nargs="+", default=["clip_like", "aligned", "shapes", "digits"])
    ap.add_argument("--kinds", nargs="+", default=["shuffle", "confusable", "attribute", "mixed"])
    ap.add_argument("--val-noise", nargs="+", type=float, default=[0.0, 0.1, 0.2])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--csv", help="also write every row to this CSV")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for geometry in args.geometries:
        for kind in args.kinds:
            for share in args.val_noise:
                for seed in range(args.seeds):
                    rows.append(one_cell(geometry, kind, share, seed, args))
                    print(f"done {geometry} {kind} {share} seed={seed} ({time.time() - t0:.0f} s)")
    df = pd.DataFrame(rows)
    if args.csv:
        df.to_csv(args.csv, index=False)
    keys = ["geometry", "kind", "val_noise"]
    cols = ["planted_held", "estimate", "warned", "training_over_validation", "probe_rate", "ap"]
    cell = df.groupby(keys)[cols].mean().round(3).reset_index()
    print(markdown(cell))
    df["abs_error"] = (df["estimate"] - df["planted_held"]).abs()
    by_share = df.groupby("val_noise").agg(
        warned=("warned", "mean"),
        estimate=("estimate", "mean"),
        largest=("estimate", "max"),
        abs_error=("abs_error", "mean"),
        ap=("ap", "mean"),
    )
    print(markdown(by_share.round(4).reset_index()))
    print(f"\n{args.seeds} seeds, n={args.n}, n_val={args.n_val}, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
