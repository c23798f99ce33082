"""How should the head's scale and pull be chosen? The study behind the defaults.

    python benchmarks/bench_select.py --seeds 3            # 4 geometries x 5 noise kinds x 3 seeds
    python benchmarks/bench_select.py --seeds 2 --kinds mixed attribute

For every cell (``bench_detect.make_sets``: same data, same noise), heads are fit on a grid
(logit scale 0.5 and 1 times the calibrated temperature, lam 1e-3, 1e-2, 1e-1) on the
training pairs plus planted probes (10%: ``ecif.audit.selection.make_probes``); each head's
misalign_score is the default suspect mixture over its signals. Then four ways to pick a cell:
the fixed rule (0.5 x calibrated, lam 1e-2: the default), the lowest validation loss, the best
probe AUROC, and the oracle (best AP on the planted noise, which no user has). Prints the AP
each rule gets per cell and its gap to the oracle.

Also per cell: the default audit as it runs (the fixed rule's head fit cold on the training
pairs alone, no probes), and the seconds each way of choosing costs: the fixed rule =
calibration + one cold fit + scoring; probe selection = planting probes + calibration + the
six fits (warm-started along the pull) + six scorings. With several seeds, each rule's mean
AP per seed is compared with the fixed rule's, paired by seed: mean difference and 95%
t interval (mean +- t sd / sqrt(n)); a win or loss only when the interval excludes 0. Per
cell, the count of cells where every seed's difference has one sign.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from bench_detect import GEOMETRIES, KINDS, make_sets, markdown
from scipy import stats

import ecif
from ecif.audit.auditor import misalign_scores
from ecif.audit.metrics import auroc, average_precision
from ecif.audit.selection import calibrated_scale, make_probes

MULTIPLES = (0.5, 1.0)
LAMS = (1e-1, 1e-2, 1e-3)  # strongest pull first: each fit warm-starts the next


def _audit_score(head, data, val) -> np.ndarray:
    """The default misalign_score of ``data`` under ``head``."""
    df = ecif.score(head, data, val)
    table = pd.DataFrame(
        {
            "influence": df["influence"].to_numpy(),
            "pair_loss": ecif.api.pair_losses(head, data),
            "clip_score": ecif.audit.clip_scores(data),
        }
    )
    return misalign_scores(table, "auto", head.n_norm)[0]


def cell(geometry: str, kind: str, seed: int, args) -> tuple[list[dict], dict]:
    train, val, labels = make_sets(geometry, kind, args.noise, seed, args.n, args.n_val, args.d)
    x, y = np.asarray(train.image), np.asarray(train.text)
    t0 = time.perf_counter()
    t_cal = calibrated_scale(val.image, val.text, 256, seed)
    s_cal = time.perf_counter() - t0
    # the default audit as it runs: the fixed rule's head, cold, on the training pairs alone
    t0 = time.perf_counter()
    head = ecif.fit(train, logit_scale=0.5 * t_cal, lam=1e-2, seed=seed)
    score = _audit_score(head, train, val)
    s_fixed = time.perf_counter() - t0
    audit = {
        "geometry": geometry,
        "kind": kind,
        "seed": seed,
        "ap": average_precision(labels, score),
        "s_fixed": s_cal + s_fixed,
    }
    t0 = time.perf_counter()
    px, py, _ = make_probes(x, y, 0.1, seed + 1)
    data = ecif.EmbeddingSet(np.concatenate([x, px]), np.concatenate([y, py]))
    is_probe = np.r_[np.zeros(len(x), bool), np.ones(len(px), bool)]
    s_probe = s_cal + time.perf_counter() - t0
    rows = []
    for m in MULTIPLES:
        head = None
        for lam in LAMS:
            t0 = time.perf_counter()
            head = ecif.fit(data, logit_scale=m * t_cal, lam=lam, seed=seed, init=head)
            score = _audit_score(head, data, val)
            s_probe += time.perf_counter() - t0
            rows.append(
                {
                    "geometry": geometry,
                    "kind": kind,
                    "seed": seed,
                    "multiple": m,
                    "lam": lam,
                    "ap": average_precision(labels, score[: len(x)]),
                    "val_loss": head.loss(val),
                    "probe_auroc": auroc(is_probe, score),
                }
            )
    audit["s_probe"] = s_probe
    return rows, audit


def pick(df: pd.DataFrame, audits: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (geo, kind, seed), c in df.groupby(["geometry", "kind", "seed"], sort=False):
        fixed = c[(c["multiple"] == 0.5) & (c["lam"] == 1e-2)].iloc[0]
        a = audits[(audits["geometry"] == geo) & (audits["kind"] == kind)]
        a = a[a["seed"] == seed].iloc[0]
        out.append(
            {
                "geometry": geo,
                "kind": kind,
                "seed": seed,
                "fixed rule (default)": fixed["ap"],
                "lowest val loss": c.loc[c["val_loss"].idxmin(), "ap"],
                "best probe AUROC": c.loc[c["probe_auroc"].idxmax(), "ap"],
                "oracle": c["ap"].max(),
                "default audit (no probes)": a["ap"],
                "s fixed": a["s_fixed"],
                "s probes": a["s_probe"],
            }
        )
    return pd.DataFrame(out)


def paired(picks: pd.DataFrame, rules: list[str], ref: str) -> pd.DataFrame:
    """Each rule against ``ref``: mean AP per seed, paired differences, 95% t interval over
    seeds, and the cells where every seed's difference has one sign."""
    per_seed = picks.groupby("seed")[[ref, *rules]].mean()
    n = len(per_seed)
    t = stats.t.ppf(0.975, n - 1) if n > 1 else float("nan")
    out = []
    for r in rules:
        d = per_seed[r] - per_seed[ref]
        half = t * d.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
        lo, hi = d.mean() - half, d.mean() + half
        verdict = "win" if lo > 0 else "loss" if hi < 0 else "within noise"
        cd = (picks[r] - picks[ref]).groupby([picks["geometry"], picks["kind"]], sort=False)
        out.append(
            {
                "rule": r,
                "vs": ref,
                "per-seed differences": " ".join(f"{v:+.4f}" for v in d),
                "mean difference": f"{d.mean():+.4f}",
                "95% interval": f"[{lo:+.4f}, {hi:+.4f}]",
                "verdict": verdict if n > 1 else "one seed",
                "cells all seeds +/-": f"{int((cd.min() > 0).sum())} / {int((cd.max() < 0).sum())}",
            }
        )
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=GEOMETRIES)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--csv", help="write every cell and seed's picks and seconds here")
    args = ap.parse_args()
    t0 = time.time()
    rows, audits = [], []
    for geo in args.geometries:
        for kind in args.kinds:
            for seed in range(args.seeds):
                r, a = cell(geo, kind, seed, args)
                rows += r
                audits.append(a)
                print(f"done {geo} {kind} seed={seed} ({time.time() - t0:.0f} s)", flush=True)
    picks = pick(pd.DataFrame(rows), pd.DataFrame(audits))
    rules = ["fixed rule (default)", "lowest val loss", "best probe AUROC", "oracle"]
    print("\n## AP of the cell each rule picks (mean over seeds)\n")
    means = picks.groupby(["geometry", "kind"], sort=False)[
        [*rules, "default audit (no probes)", "s fixed", "s probes"]
    ].mean()
    print(markdown(means.round(3).reset_index()))
    gaps = picks[rules[:-1]].sub(picks["oracle"], axis=0)
    summary = pd.DataFrame(
        {"rule": rules[:-1], "mean AP": picks[rules[:-1]].mean().round(3).to_numpy(),
         "mean gap to oracle": gaps.mean().round(3).to_numpy(),
         "worst gap to oracle": gaps.min().round(3).to_numpy()}
    )  # fmt: skip
    print("\n## Summary (all cells and seeds)\n")
    print(markdown(summary))
    print("\n## Paired by seed: mean AP over the cells, each rule minus the fixed rule\n")
    diffs = pd.concat(
        [
            paired(picks, rules[1:3], rules[0]),
            paired(picks, ["best probe AUROC"], "default audit (no probes)"),
        ]
    )
    print(markdown(diffs))
    extra = picks["s probes"] - picks["s fixed"]
    print(
        f"\nSeconds per cell: fixed rule {picks['s fixed'].mean():.1f} (median "
        f"{picks['s fixed'].median():.1f}), probe selection {picks['s probes'].mean():.1f} "
        f"(median {picks['s probes'].median():.1f}): {extra.mean():+.1f} s, "
        f"x{(picks['s probes'] / picks['s fixed']).median():.1f} (median ratio)"
    )
    print(f"\n{len(picks)} cells, n={args.n}, {time.time() - t0:.0f} s")
    if args.csv:
        picks.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
