"""Exact copies of pairs: the default audit (copies collapsed: each distinct pair fit and
scored once) against ``duplicates="keep"`` (every row as it is, the behaviour before) and the
audit's single signals, with DEFAULT options otherwise.

    python benchmarks/bench_duplicates.py                       # 2 geometries x 2 shares x 3 seeds
    python benchmarks/bench_duplicates.py --law zipf            # a few pairs copied many times
    python benchmarks/bench_duplicates.py --geometries digits --shares 0.25

Each cell: a training set of ``--n`` pairs (20% mixed noise, ``bench_detect.make_sets``) in
which a share of the rows is replaced by copies of the others (image and text embeddings and
the noise label together: a copied swap is noise every time), and a clean validation set.
``--law uniform``: every other row equally likely to be copied; ``zipf``: the row of rank r
with probability ~ 1/r (a popular pair copied many times, as on the web). AP of the ranking
against the noise of every row (a pair copied k times counts k times).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
from bench_detect import make_sets

import ecif
from ecif.audit.metrics import average_precision


def with_copies(train, labels: np.ndarray, share: float, law: str, seed: int):
    """``train`` with ``share`` of its rows replaced by copies of the remaining rows."""
    rng = np.random.default_rng([seed, 77])
    n = len(train)
    replaced = rng.choice(n, int(share * n), replace=False)
    kept = np.setdiff1d(np.arange(n), replaced)
    if law == "zipf":
        p = 1.0 / np.arange(1, len(kept) + 1)
        sources = rng.permutation(kept)[rng.choice(len(kept), len(replaced), p=p / p.sum())]
    else:
        sources = rng.choice(kept, len(replaced))
    rows = np.arange(n)
    rows[replaced] = sources
    out = ecif.EmbeddingSet(
        np.asarray(train.image)[rows],
        np.asarray(train.text)[rows],
        ids=np.arange(n),
        metadata=train.metadata.iloc[rows].reset_index(drop=True),
        logit_scale=train.logit_scale,
    )
    return out, labels[rows]


def one_cell(geometry: str, share: float, seed: int, args) -> dict:
    train, val, labels = make_sets(geometry, "mixed", 0.2, seed, args.n, args.n_val, args.d)
    train, labels = with_copies(train, labels, share, args.law, seed)
    val = None if args.no_val else val
    row = {"geometry": geometry, "share": share, "seed": seed}
    for mode in ("collapse", "keep"):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed, duplicates=mode)).run()
        row[f"{mode} s"] = time.perf_counter() - t0
        row[f"default ({mode})" if mode == "collapse" else "keep (before)"] = average_precision(
            labels, table["misalign_score"].to_numpy()
        )
        if mode == "keep":  # the signals as an audit of every row sees them
            row["pair_loss"] = average_precision(labels, table["pair_loss"].to_numpy())
            if val is not None:
                row["trusted_loss"] = average_precision(labels, table["trusted_loss"].to_numpy())
            row["clip_score"] = average_precision(labels, -table["clip_score"].to_numpy())
    return row


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--geometries", nargs="+", default=["clip_like", "aligned"])
    p.add_argument("--shares", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--law", choices=("uniform", "zipf"), default="uniform")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--n-val", type=int, default=400)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--no-val", action="store_true", help="audit without the validation set")
    a = p.parse_args()
    t0 = time.time()
    rows = []
    for geometry in a.geometries:
        for share in a.shares:
            for seed in range(a.seeds):
                rows.append(one_cell(geometry, share, seed, a))
                print(
                    f"done {geometry} {share:g} seed={seed} ({time.time() - t0:.0f} s)", flush=True
                )
    df = pd.DataFrame(rows)
    df["gain"] = df["default (collapse)"] - df["keep (before)"]
    cols = ["default (collapse)", "keep (before)", "gain", "pair_loss", "trusted_loss"]
    cols = [c for c in [*cols, "clip_score"] if c in df]  # no trusted_loss without validation
    val = "no validation set" if a.no_val else f"n_val={a.n_val}"
    print(f"\n## AP per seed ({a.law} copies, n={a.n}, {val}, 20% mixed noise)\n")
    print("| geometry | copies | seed | " + " | ".join(cols) + " | s (collapse / keep) |")
    print("|---" * (len(cols) + 4) + "|")  # geometry, copies, seed, the columns, seconds
    for _, r in df.iterrows():
        vals = " | ".join(f"{r[c]:+.3f}" if c == "gain" else f"{r[c]:.3f}" for c in cols)
        secs = f"{r['collapse s']:.1f} / {r['keep s']:.1f}"
        print(f"| {r['geometry']} | {r['share']:.0%} | {r['seed']} | {vals} | {secs} |")
    g = df.groupby(["geometry", "share"])["gain"]
    print("\n## Gain of the default over keep, mean [min, max] over seeds\n")
    for (geometry, share), v in g:
        print(f"- {geometry}, {share:.0%} copies: {v.mean():+.3f} [{v.min():+.3f}, {v.max():+.3f}]")
    print(f"\n{a.seeds} seeds, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
