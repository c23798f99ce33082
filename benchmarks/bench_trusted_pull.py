"""The trusted head's pull measured on the validation pairs, against the audit's own pull
(the default). Tried in session 26 and not adopted: benchmarks/README.md ("The trusted head's
pull, measured by held-out loss").

    python benchmarks/bench_trusted_pull.py --geometries digits clip_like --seeds 3
    python benchmarks/bench_trusted_pull.py --geometries latent_aligned --d 512 --seeds 2 \
        --kinds confusable attribute

The trusted head (``trusted_loss``) is fit on the validation pairs alone with the training
head's pull. The trial measures its pull instead: a ladder of 1/64 .. 16 times the audit's
pull, walked from 1x down while the held-out loss falls (up when the first step down is
worse), the held-out loss being the mean pair loss of one half of the validation pairs under
the head fit on the other half, both ways, each fit warm-started from the rung before.
``--refit-scale`` scores each held-out half at the logit scale that suits it (a golden-section
search of a scalar on the logits), so the pull is judged on what the head separates, not on
how sharp its logits are. The twin audit (planted probes) fits its trusted head the same way,
so the signal weights see the trial's ``trusted_loss``.

Prints, per cell, the default's misalign_score AP, the trial's, their paired difference
(mean and [min, max] over seeds), the same for ``trusted_loss`` alone, and the pulls chosen.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from bench_detect import GEOMETRIES, KINDS, make_sets
from sklearn.metrics import average_precision_score

import ecif
import ecif.api as api
from ecif.audit.selection import golden_section
from ecif.data.concepts import HELD_OUT
from ecif.data.duplicates import image_halves
from ecif.data.latent import LATENT_GEOMETRIES
from ecif.engine.batches import make_partition

LADDER = (1 / 64, 1 / 16, 1 / 4, 1.0, 4.0, 16.0)  # rungs, times the audit's pull
START = LADDER.index(1.0)
REFIT_SCALE = False  # --refit-scale


def _best_scale_loss(blocks: list[torch.Tensor]) -> float:
    """Mean symmetric InfoNCE of the held-out logits at the multiplier that minimises it
    (convex in the multiplier: a golden-section search over [0.05, 20])."""

    def loss(log_c: float) -> float:
        z = [np.exp(log_c) * s for s in blocks]
        total = sum((b.logsumexp(1) + b.logsumexp(0) - 2 * b.diagonal()).sum().item() for b in z)
        return total / sum(len(b) for b in z)

    return loss(golden_section(loss, np.log(0.05), np.log(20.0)))


def _held_out(head, held) -> float:
    """The held-out pairs' mean loss under ``head``, in seeded batches of its size."""
    part = make_partition(len(held), head.batch_size, 0)
    if not REFIT_SCALE:
        return float(np.nanmean(api.pair_losses(replace(head, partition=part), held)))
    x = torch.as_tensor(np.asarray(held.image), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(held.text), dtype=torch.float64)
    m, blocks = head.m.double(), []
    for rows in part.index:
        rows = torch.as_tensor(rows[rows >= 0])
        if len(rows) > 1:
            blocks.append(head.logit_scale * (x[rows] @ m) @ y[rows].T)
    return _best_scale_loss(blocks)


def measured_pull(auditor: ecif.Auditor) -> tuple[float, dict]:
    """(the pull with the lowest held-out loss on the ladder, {pull: loss} as walked)."""
    val, lam = auditor.val, auditor.choose().lam
    rows = image_halves(np.asarray(val.image), auditor.args.seed)
    halves = [
        (val.subset(rows[0]), val.subset(rows[1])),
        (val.subset(rows[1]), val.subset(rows[0])),
    ]
    warm: list = [None, None]

    def held_out_loss(pull: float) -> float:
        losses = []
        for k, (fit_on, held) in enumerate(halves):
            warm[k] = auditor.fit_head(fit_on, lam=pull, init=warm[k])
            losses.append(_held_out(warm[k], held))
        return float(np.mean(losses))

    tried = {START: held_out_loss(lam)}
    for step in (-1, 1):  # down while the loss falls; up only when the first step down rose
        rung = START + step
        while 0 <= rung < len(LADDER):
            tried[rung] = held_out_loss(lam * LADDER[rung])
            if tried[rung] >= tried[rung - step]:
                break
            rung += step
        if min(tried, key=tried.get) != START:
            break
    best = min(tried, key=tried.get)
    return lam * LADDER[best], {lam * LADDER[r]: loss for r, loss in tried.items()}


class MeasuredPullAuditor(ecif.Auditor):
    """The default audit, its trusted head (and its twin's) fit at the measured pull."""

    def fit_trusted_head(self):
        if self.trusted is None:
            pull, losses = measured_pull(self)
            self.trusted = self.fit_head(self.val, lam=pull)
            self.trusted.info["trusted_pull"] = losses
        return self.trusted


def run_cell(geometry: str, kind: str, seed: int, args) -> dict:
    train, val, labels = make_sets(geometry, kind, args.noise, seed, args.n, args.n_val, args.d)
    out = {}
    for name, cls in (("default", ecif.Auditor), ("measured", MeasuredPullAuditor)):
        t0 = time.perf_counter()
        aud = cls(train, val, ecif.AuditArgs(seed=seed))
        table = aud.run()
        rows = aud.distinct_rows()
        table, y = table.iloc[rows], labels[rows]
        out[name] = {
            "ap": average_precision_score(y, table["misalign_score"]),
            "trusted": average_precision_score(y, table["trusted_loss"]),
            "seconds": time.perf_counter() - t0,
            "pull": aud.trusted.lam,
        }
    return out


def _span(v: list[float]) -> str:
    return f"{np.mean(v):+.4f} [{min(v):+.4f}, {max(v):+.4f}]"


def main() -> None:
    global REFIT_SCALE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    every = list(GEOMETRIES) + list(HELD_OUT) + list(LATENT_GEOMETRIES)
    ap.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=every)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--d", type=int, default=64, help="width of the synthetic geometries")
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--refit-scale", action="store_true", help="judge each rung at its best scale")
    args = ap.parse_args()
    REFIT_SCALE = args.refit_scale
    print(f"# trusted head's pull: measured{' (scale refit)' if REFIT_SCALE else ''} vs default")
    print("| geometry | kind | default AP | measured AP | diff | trusted_loss diff | pulls |")
    print("|---|---|---|---|---|---|---|")
    every_diff = []
    for g in args.geometries:
        for kind in args.kinds:
            cells = [run_cell(g, kind, s, args) for s in range(args.seeds)]
            d = [c["measured"]["ap"] - c["default"]["ap"] for c in cells]
            t = [c["measured"]["trusted"] - c["default"]["trusted"] for c in cells]
            every_diff += d
            pulls = " ".join(f"{c['measured']['pull']:.3g}" for c in cells)
            print(
                f"| {g} | {kind} | {np.mean([c['default']['ap'] for c in cells]):.4f} | "
                f"{np.mean([c['measured']['ap'] for c in cells]):.4f} | {_span(d)} | {_span(t)} "
                f"| {pulls} |",
                flush=True,
            )
    print(f"\nmean paired difference over {len(every_diff)} cell-seeds: {_span(every_diff)}")


if __name__ == "__main__":
    main()
