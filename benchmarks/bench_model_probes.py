"""A model mode's audit with its twin's planted probes against the same audit without them,
on other data and noise than ``bench_model_mode.py``'s, with or without a validation set.

    python benchmarks/bench_model_probes.py --data shapes --seeds 4
    python benchmarks/bench_model_probes.py --no-val --seeds 4
    python benchmarks/bench_model_probes.py --no-val --no-val-mode self --seeds 3
    python benchmarks/bench_model_probes.py --noise-kind shuffle --seeds 3
    python benchmarks/bench_model_probes.py --no-val --logit-scale trimmed --data shapes --seeds 4
    python benchmarks/bench_model_probes.py --no-val --no-val-mode crossfit --noise 0.1
    python benchmarks/bench_model_probes.py --no-val --self-probes 16 --seeds 4

Per seed: ``--data`` (digits or shapes) rendered as images with captions, ``--noise`` (20%) of
``--noise-kind``, embedded by the tiny CLIP with the mode's feature cache; a clean validation
set of 300 pairs the same way. The mode's audit with DEFAULT options (probes), recombined
without its probes (the mixture alone: the default before), the head mode's default audit
and clip_score: AP per seed, the paired difference and its 95% interval over seeds; the mode's
logit scale and, for reference, the one calibrated on the training set's clean pairs alone;
the seconds of the mode's audit.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_model_mode import embedded
from scipy import stats
from sklearn.metrics import average_precision_score

import ecif
import ecif.audit.model_signals
import ecif.audit.probes
from ecif.audit.misalign import misalign_scores
from ecif.audit.selection import SelectArgs, calibrated_scale, trimmed_scale


def one_seed(a, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"kind": a.params, "blocks": 1, "data": a.data, "noise_kind": a.noise_kind}
        train, train_set, labels = embedded(tmp / "train", a.n, seed, a.noise, **sets)
        val, val_set, _ = embedded(tmp / "val", 300, seed + 1000, 0.0, **sets)
        if a.no_val:
            val = val_set = None
        y = labels.loc[np.asarray(train.ids).astype(str), "is_corrupted"].to_numpy()
        scale = a.logit_scale
        drop = SelectArgs().untrusted_drop
        if scale == "trimmed":  # the head mode's calibration without trusted pairs
            scale = trimmed_scale(train_set.image, train_set.text, drop, 64, seed)
        elif scale == "all":  # the calibration on every training pair
            scale = calibrated_scale(train_set.image, train_set.text, 64, seed)
        elif scale == "geometric":  # between the all-pairs and the trimmed calibration
            every = calibrated_scale(train_set.image, train_set.text, 64, seed)
            trimmed = trimmed_scale(train_set.image, train_set.text, drop, 64, seed, start=every)
            scale = float(np.sqrt(every * trimmed))
        args = ecif.AuditArgs(
            params=a.params,
            batch_size=64,
            seed=seed,
            no_val=a.no_val_mode,
            logit_scale=scale,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            audit = ecif.Auditor(train_set, val_set, args, train_features=train, val_features=val)
            start = time.perf_counter()
            table = audit.run()
            seconds = time.perf_counter() - start
            head = ecif.Auditor(train_set, val_set, ecif.AuditArgs(batch_size=64, seed=seed)).run()
    n_norm = float(np.mean([h.n_norm for h in audit.heads]))
    clean = ~labels.loc[np.asarray(train_set.ids).astype(str), "is_corrupted"].to_numpy()
    scales = {
        "mode scale": float(audit.heads[0].logit_scale),
        "mode audit s": seconds,
        "clean-pair scale": calibrated_scale(
            train_set.image[clean], train_set.text[clean], 64, seed
        ),
    }
    return {
        "probes (default)": average_precision_score(y, table["misalign_score"]),
        "no probes": average_precision_score(y, misalign_scores(table, "auto", n_norm)[0]),
        "head mode": average_precision_score(y, head["misalign_score"]),
        "clip_score": average_precision_score(y, -table["clip_score"]),
    } | scales


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", choices=("digits", "shapes"), default="digits")
    ap.add_argument("--noise-kind", default="mixed", help="the dataset's noise_kind")
    ap.add_argument("--params", choices=("projection", "lora"), default="projection")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--noise", type=float, default=0.2, help="share of training pairs corrupted")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-val", action="store_true", help="audit without the validation set")
    ap.add_argument(
        "--logit-scale",
        default="auto",
        type=lambda v: v if v in ("auto", "model", "trimmed", "geometric", "all") else float(v),
        help="the mode's audit's logit_scale option (default auto; the head mode's stays auto); "
        "trimmed: the head mode's calibration without trusted pairs (the training pairs less "
        "the fifth the pretrained similarity fits worst); all: the calibration on every training "
        "pair (a cross-fit's auto); geometric: the geometric mean of the two (self-influence's "
        "auto)",
    )
    ap.add_argument(
        "--no-val-mode",
        choices=("auto", "self", "crossfit"),
        default="auto",
        help="with --no-val: the mode's audit's no_val option (the head mode's stays auto)",
    )
    ap.add_argument(
        "--self-probes",
        type=int,
        default=None,
        help="random probes of a self-influence audit (default: the audit's own, "
        "ecif.audit.model_signals.PROBES); the twin audit uses as many",
    )
    ap.add_argument(
        "--twin-rows",
        type=int,
        default=None,
        help="real pairs in the twin audit (default: ecif.audit.probes.MODEL_TWIN_MAX_ROWS; a "
        "seeded sample of larger sets)",
    )
    a = ap.parse_args()
    if a.twin_rows is not None:
        ecif.audit.probes.MODEL_TWIN_MAX_ROWS = a.twin_rows
    if a.self_probes is not None:
        ecif.audit.model_signals.PROBES = a.self_probes
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    df = pd.DataFrame([one_seed(a, seed) for seed in range(a.seeds)])
    print(df.round(4).to_string())
    diff = df["probes (default)"] - df["no probes"]
    t = stats.t.ppf(0.975, len(df) - 1) if len(df) > 1 else np.nan
    half = t * diff.std(ddof=1) / np.sqrt(len(df))
    aps = df.drop(columns=["mode scale", "clean-pair scale", "mode audit s"])
    print("mean AP: " + ", ".join(f"{k} {v:.4f}" for k, v in aps.mean().items()))
    print(
        f"mean logit scale: the mode's {df['mode scale'].mean():.3g}, the clean training "
        f"pairs' own calibration {df['clean-pair scale'].mean():.3g}; the mode's audit "
        f"{df['mode audit s'].mean():.1f} s a seed (its twin included)"
    )
    print(
        f"probes minus none: per seed {', '.join(f'{d:+.4f}' for d in diff)}; "
        f"mean {diff.mean():+.4f} [{diff.mean() - half:+.4f}, {diff.mean() + half:+.4f}]"
    )


if __name__ == "__main__":
    main()
