"""How should the head's scale and pull be chosen? The study behind the defaults.

    python benchmarks/bench_select.py                      # 4 geometries x 5 noise kinds, 1 seed
    python benchmarks/bench_select.py --seeds 2 --kinds mixed attribute

For every cell (``bench_detect.make_sets``: same data, same noise), heads are fit on a grid
(logit scale 0.5 and 1 times the calibrated temperature, lam 1e-3, 1e-2, 1e-1) on the
training pairs plus planted probes (10%: ``ecif.audit.selection.make_probes``); each head's
misalign_score is the default suspect mixture over its signals. Then four ways to pick a cell:
the fixed rule (0.5 x calibrated, lam 1e-2: the default), the lowest validation loss, the best
probe AUROC, and the oracle (best AP on the planted noise, which no user has). Prints the AP
each rule gets per cell and its gap to the oracle.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from bench_detect import GEOMETRIES, KINDS, make_sets, markdown

import ecif
from ecif.audit.auditor import misalign_scores
from ecif.audit.metrics import auroc, average_precision
from ecif.audit.selection import calibrated_scale, make_probes

MULTIPLES = (0.5, 1.0)
LAMS = (1e-1, 1e-2, 1e-3)  # strongest pull first: each fit warm-starts the next


def cell(geometry: str, kind: str, seed: int, args) -> list[dict]:
    train, val, labels = make_sets(geometry, kind, args.noise, seed, args.n, args.n_val, args.d)
    x, y = np.asarray(train.image), np.asarray(train.text)
    px, py, _ = make_probes(x, y, 0.1, seed + 1)
    data = ecif.EmbeddingSet(np.concatenate([x, px]), np.concatenate([y, py]))
    is_probe = np.r_[np.zeros(len(x), bool), np.ones(len(px), bool)]
    t_cal = calibrated_scale(val.image, val.text, 256, seed)
    rows = []
    for m in MULTIPLES:
        head = None
        for lam in LAMS:
            head = ecif.fit(data, logit_scale=m * t_cal, lam=lam, seed=seed, init=head)
            df = ecif.score(head, data, val)
            table = pd.DataFrame(
                {
                    "influence": df["influence"].to_numpy(),
                    "pair_loss": ecif.api.pair_losses(head, data),
                    "clip_score": ecif.audit.clip_scores(data),
                }
            )
            score, _, _ = misalign_scores(table, "auto", head.n_norm)
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
    return rows


def pick(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (geo, kind, seed), c in df.groupby(["geometry", "kind", "seed"], sort=False):
        fixed = c[(c["multiple"] == 0.5) & (c["lam"] == 1e-2)].iloc[0]
        out.append(
            {
                "geometry": geo,
                "kind": kind,
                "seed": seed,
                "fixed rule (default)": fixed["ap"],
                "lowest val loss": c.loc[c["val_loss"].idxmin(), "ap"],
                "best probe AUROC": c.loc[c["probe_auroc"].idxmax(), "ap"],
                "oracle": c["ap"].max(),
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
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for geo in args.geometries:
        for kind in args.kinds:
            for seed in range(args.seeds):
                rows += cell(geo, kind, seed, args)
                print(f"done {geo} {kind} seed={seed} ({time.time() - t0:.0f} s)", flush=True)
    picks = pick(pd.DataFrame(rows))
    rules = ["fixed rule (default)", "lowest val loss", "best probe AUROC", "oracle"]
    print("\n## AP of the cell each rule picks\n")
    print(markdown(picks.round(3)))
    gaps = picks[rules[:-1]].sub(picks["oracle"], axis=0)
    summary = pd.DataFrame(
        {"rule": rules[:-1], "mean AP": picks[rules[:-1]].mean().round(3).to_numpy(),
         "mean gap to oracle": gaps.mean().round(3).to_numpy(),
         "worst gap to oracle": gaps.min().round(3).to_numpy()}
    )  # fmt: skip
    print("\n## Summary\n")
    print(markdown(summary))
    print(f"\n{len(picks)} cells, n={args.n}, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
