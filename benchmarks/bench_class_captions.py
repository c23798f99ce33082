"""Classification sets captioned by their labels: every image of a class shares one caption,
so captions repeat exactly, and the noise is label flips (``ecif.data.concepts.
class_caption_pairs``). Audited with DEFAULT options, with and without validation pairs.

    python benchmarks/bench_class_captions.py                       # 2, 4 and 10 classes
    python benchmarks/bench_class_captions.py --classes 4 --geometries aligned --seeds 5

Printed per cell: AP of ``misalign_score``, of ``clip_score`` and of ``pair_loss`` (mean over
seeds), and what the automatic threshold flags against the planted count (mean [min, max]):
as shipped, and before its count was checked against the final score's own two groups
(``thresholds.checked_by_score``; recomputed in the same process from the audit's signals).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
from bench_detect import markdown

import ecif
from ecif.audit.metrics import ranking_metrics
from ecif.audit.misalign import misalign_scores
from ecif.data.concepts import GEOMETRIES, HELD_OUT, class_caption_pairs


def one_audit(classes: int, geometry: str, seed: int, validated: bool, args) -> dict:
    """One audit's APs and flagged / true, shipped and before the score check."""
    x, y, frame = class_caption_pairs(args.n, classes, args.noise, seed, geometry, args.d)
    val = None
    if validated:
        xv, yv, _ = class_caption_pairs(args.n_val, classes, 0.0, seed + 100, geometry, args.d)
        val = ecif.EmbeddingSet(xv, yv, logit_scale=100.0)
    train = ecif.EmbeddingSet(x, y, logit_scale=100.0)
    aud = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = aud.run()
    labels = frame["is_corrupted"].to_numpy()
    pairs = table.iloc[aud.distinct_rows()].reset_index(drop=True)
    n_norm = float(np.mean([h.n_norm for h in aud.heads]))
    rate = misalign_scores(pairs, "auto", n_norm, aud.probes)[2]
    before = rate.rate if rate.reliable else rate.fallback_fraction()
    true = labels.mean()
    ap = {c: ranking_metrics(labels, s)["ap"] for c, s in (
        ("misalign_score", table["misalign_score"].to_numpy()),
        ("clip_score", -table["clip_score"].to_numpy()),
        ("pair_loss", table["pair_loss"].to_numpy()),
    )}  # fmt: skip
    return dict(classes=classes, geometry=geometry, validation="yes" if validated else "no",
                seed=seed, **ap, flagged=table["is_misaligned"].mean() / true,
                before=before / true)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--classes", type=int, nargs="+", default=[2, 4, 10])
    ap.add_argument("--geometries", nargs="+", default=["clip_like", "aligned"], choices=GEOMETRIES)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.2)
    args = ap.parse_args()
    t0, rows = time.time(), []
    for classes in args.classes:
        for geometry in args.geometries:
            for validated in (True, False):
                for seed in range(args.seeds):
                    rows.append(one_audit(classes, geometry, seed, validated, args))
            print(f"done {classes} classes, {geometry} ({time.time() - t0:.0f} s)", flush=True)
    df = pd.DataFrame(rows)
    keys = ["classes", "geometry", "validation"]
    cells = df.groupby(keys, sort=False)
    out = cells[["misalign_score", "clip_score", "pair_loss"]].mean().round(3)
    for col in ("flagged", "before"):
        g = cells[col]
        out[f"{col} / true"] = [
            f"{m:.2f} [{a:.2f}, {b:.2f}]" for m, a, b in zip(g.mean(), g.min(), g.max())
        ]
    out = out.rename(columns={"flagged / true": "flagged / true (shipped)",
                              "before / true": "before the score check"})  # fmt: skip
    print(f"\n## Class captions, {args.noise:.0%} labels flipped, {args.seeds} seeds\n")
    print(markdown(out.reset_index()))
    print(f"\n{len(df)} audits, {time.time() - t0:.0f} s (geometries held out: {HELD_OUT})")


if __name__ == "__main__":
    main()
