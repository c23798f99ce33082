"""Misalignment detection and cleaning on the shapes data, against real baselines.

    python benchmarks/bench_detect.py                      # 10/20/30% noise x 3 seeds
    python benchmarks/bench_detect.py --noise 0.2 --seeds 1 --n 1000

For every (noise, seed): shapes pairs with that fraction of shuffled captions are embedded
with the tiny CLIP (the real `ecif.embed` path), the head is fit, and each ranking is scored
against the ground truth: ecif (misalign_score, exact and first-order negative term),
clip_score, per-pair loss under the head, TracIn-style (identity Hessian: w = g_val) and
random. Then the cleaning comparison: drop the flagged count by each strategy and refit.
Prints markdown tables (means and per-seed min..max).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ecif
from ecif.audit import AuditArgs, Auditor
from ecif.audit.auditor import pair_losses_of
from ecif.audit.clean import compare_cleaning
from ecif.audit.demo import auroc, average_precision
from ecif.data.tiny_clip import tiny_clip
from ecif.engine.influence import loss_gradient, score_pass


def embed_shapes(data, folder: Path, model: str) -> ecif.EmbeddingSet:
    data.to_parquet(folder / "shards", shard_size=1000)
    ecif.embed(folder / "shards", folder / "emb", model=model)
    return ecif.EmbeddingSet.load(folder / "emb")


def rank_metrics(labels: np.ndarray, score: np.ndarray) -> dict:
    k = int(labels.sum())
    top = np.argsort(-score, kind="stable")[:k]
    return {
        "auroc": auroc(labels, score),
        "ap": average_precision(labels, score),
        "p@k": labels[top].mean(),
    }


def one_run(
    noise: float, seed: int, n: int, val: ecif.EmbeddingSet, model: str, work: Path
) -> tuple[list, list]:
    data = ecif.datasets.shapes(n=n, seed=seed, noise=noise)
    train = embed_shapes(data, work / f"train_{noise}_{seed}", model)
    labels = data.frame.set_index("key").loc[train.ids, "is_corrupted"].to_numpy()
    aud = Auditor(train, val, AuditArgs(seed=seed))
    table = aud.run()
    head = aud.heads[0]
    first = Auditor(train, val, AuditArgs(seed=seed, neg="first_order")).run()
    g = loss_gradient(head, val.image, val.text)
    d_pos, d_neg = score_pass(head, train.image, train.text, g)
    rng = np.random.default_rng(seed)
    rankings = {
        "ecif (exact Neg)": table["misalign_score"].to_numpy(),
        "ecif (first-order Neg)": first["misalign_score"].to_numpy(),
        "ecif positive part only": -table["influence_pos"].to_numpy(),
        "clip_score (low = suspect)": -table["clip_score"].to_numpy(),
        "per-pair loss": pair_losses_of(head, train),
        "TracIn-style (identity H)": -(d_pos + d_neg),
        "random": rng.random(len(train)),
    }
    det = [
        {"noise": noise, "seed": seed, "method": k, **rank_metrics(labels, v)}
        for k, v in rankings.items()
    ]
    flagged = int(table["is_misaligned"].sum())
    det.append(
        {
            "noise": noise,
            "seed": seed,
            "method": "auto threshold: flagged / true",
            "auroc": flagged / max(1, labels.sum()),
            "ap": np.nan,
            "p@k": labels[table["is_misaligned"]].mean(),
        }
    )
    clean = compare_cleaning(head, train, val, table, count=int(labels.sum()), seed=seed)
    clean["noise"], clean["seed"] = noise, seed
    return det, clean.to_dict(orient="records")


def summarise(df: pd.DataFrame, keys: list[str], cols: list[str]) -> pd.DataFrame:
    g = df.groupby(keys, sort=False)[cols]
    mean, lo, hi = g.mean(), g.min(), g.max()
    out = mean.copy().astype(object)
    for c in cols:
        out[c] = [f"{m:.3f} ({a:.3f}..{b:.3f})" for m, a, b in zip(mean[c], lo[c], hi[c])]
    return out.reset_index()


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="training pairs per run")
    ap.add_argument("--n-val", type=int, default=500)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    model = f"local-dir:{tiny_clip()}"
    det_rows, clean_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        val = embed_shapes(
            ecif.datasets.shapes(n=args.n_val, seed=10_000, noise=0.0), work / "val", model
        )
        for noise in args.noise:
            for seed in range(args.seeds):
                d, c = one_run(noise, seed, args.n, val, model, work)
                det_rows += d
                clean_rows += c
                print(f"done noise={noise} seed={seed} ({time.time() - t0:.0f} s)", flush=True)
    det = pd.DataFrame(det_rows)
    print("\n## Detection (mean, min..max over seeds)\n")
    print(markdown(summarise(det, ["noise", "method"], ["auroc", "ap", "p@k"])))
    clean = pd.DataFrame(clean_rows)
    print("\n## Cleaning: drop as many pairs as are corrupted, refit (mean, min..max)\n")
    print(markdown(summarise(clean, ["noise", "strategy"], ["val_loss", "val_i2t_acc"])))
    print(
        f"\n{args.seeds} seeds x {len(args.noise)} noise levels, n={args.n}, {time.time() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
