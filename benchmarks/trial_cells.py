"""The cached audits that ``bench_combine_trials.py`` and ``bench_threshold.py`` recombine:
one .npz per cell-seed of ``bench_detect.py``'s grid, audited once with DEFAULT options
(the audit's signals, its twin audit's signals and probe mask, negCLIPLoss on both sets),
and the ``Cell`` that reads one back with its mixture refit."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_detect import EMBEDDING_KINDS, GEOMETRIES, KINDS, make_sets

import ecif
from ecif.audit import combine
from ecif.audit.baselines import neg_clip_loss
from ecif.audit.combine import CONSENSUS
from ecif.audit.misalign import ProbeSignals, signal_suspicions
from ecif.audit.probes import held_out_clean
from ecif.audit.selection import make_probes
from ecif.audit.thresholds import mixture_noise_rate
from ecif.data.concepts import HELD_OUT
from ecif.data.latent import LATENT_GEOMETRIES

# as far as the audit has them
SIG = ("pair_loss", "clip_score", "influence", "trusted_loss", CONSENSUS)
PROBE_KINDS = ("shuffle", "near", "generic")
COLUMNS = ("influence", "self_influence", "pair_loss", "clip_score", "trusted_loss", CONSENSUS)


def twin_rows(x: np.ndarray, y: np.ndarray, val, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The twin audit's rows: the training pairs (n <= its 20,000 cap), the probes it
    plants with default options, then the validation pairs it holds as clean rows
    (``probes.probe_signals``; none without a validation set)."""
    px, py, _ = make_probes(x, y, ecif.AuditArgs().probes, seed)
    held, _ = held_out_clean(val, seed)
    cx = np.asarray(val.image)[held] if held is not None else x[:0]
    cy = np.asarray(val.text)[held] if held is not None else y[:0]
    return np.concatenate([x, px, cx]), np.concatenate([y, py, cy])


def cache_cell(path: Path, geometry: str, kind: str, seed: int, args) -> None:
    """Audit one cell with default options and save what the trials recombine."""
    train, val, labels = make_sets(
        geometry,
        kind,
        args.noise,
        seed,
        args.n,
        args.n_val,
        args.d,
        args.class_skew,
        args.captions_per_image,
    )
    aud = ecif.Auditor(train, None if args.no_val else val, ecif.AuditArgs(seed=seed))
    table = aud.run()
    rows = aud.distinct_rows()  # each pair once, as the audit combines them (copies: none)
    table, labels = table.iloc[rows].reset_index(drop=True), labels[rows]
    x, y = np.asarray(train.image)[rows], np.asarray(train.text)[rows]
    scale = train.logit_scale or 100.0
    twin_x, twin_y = twin_rows(x, y, None if args.no_val else val, seed)
    out = {
        "labels": labels.astype(bool),
        "n_norm": np.float64(np.mean([h.n_norm for h in aud.heads])),  # as the audit's
        "shipped": table["misalign_score"].to_numpy(np.float64),
        "negclip": neg_clip_loss(x, y, logit_scale=scale, seed=seed),
        "twin_negclip": neg_clip_loss(twin_x, twin_y, logit_scale=scale, seed=seed),
        "is_probe": np.asarray(aud.probes.is_probe),
        "probe_kinds": np.asarray(aud.probes.kinds, dtype=str),
    }
    if aud.probes.is_clean is not None:
        out["is_clean"] = np.asarray(aud.probes.is_clean)
    for k in COLUMNS:
        if k in table:
            out[k] = table[k].to_numpy(np.float64)
    for k in SIG:
        if k in aud.probes.suspicions:
            out[f"twin_{k}"] = aud.probes.suspicions[k]
    np.savez(path, **out)


class Cell:
    """One cached cell: the audit's suspicions, the twin's, and the mixture over the former."""

    def __init__(self, data) -> None:
        self.d = data
        self.table = pd.DataFrame({k: data[k] for k in COLUMNS if k in data})
        self.sus = signal_suspicions(self.table, float(data["n_norm"]))
        self.twin = {k: data[f"twin_{k}"] for k in SIG if f"twin_{k}" in data}
        self.is_probe = data["is_probe"]
        # validation pairs the twin held as clean rows (caches from before them have none)
        self.is_clean = data.get("is_clean")
        self.mix = combine.fit_mixture(self.sus)
        self.log_odds = self.mix.log_odds(self.sus)
        record = self.mix.record()
        self.one_mode = not record["valley"] > 0
        self.rate = mixture_noise_rate(self.log_odds, self.mix.separation, record["valley"])
        self.base = self.mixture_score(self.sus)

    def probes(self, twin: dict | None = None) -> ProbeSignals:
        """The twin's rows as the audit hands them to ``misalign_scores`` (``twin``: other
        suspicions for the same rows)."""
        if "probe_kinds" in self.d:  # as the audit planted them
            kinds = self.d["probe_kinds"].astype(object)
        else:  # caches from before 2026-12-08: in planted order, a third each, none dropped
            kinds = np.full(len(self.is_probe), "", dtype=object)
            for rows, kind in zip(np.array_split(np.flatnonzero(self.is_probe), 3), PROBE_KINDS):
                kinds[rows] = kind
        twin = self.twin if twin is None else twin
        return ProbeSignals(twin, self.is_probe, self.is_clean, kinds)

    def mixture_score(self, suspicions: dict) -> np.ndarray:
        """The mixture's log-odds of these rows, hedged where the default hedges them."""
        log_odds = self.mix.log_odds(suspicions)
        if self.rate.reliable or self.one_mode:
            return log_odds
        return combine.hedged_score(self.mix, suspicions, log_odds)[0]

    def finish(self, lin: np.ndarray) -> np.ndarray:
        """The default's last step: z(mixture score) + z(probe-weighted features), or the
        latter alone for a one-mode mixture."""
        z = combine.Standardiser.of(lin)(lin)
        return z if self.one_mode else combine.Standardiser.of(self.base)(self.base) + z


def add_grid_arguments(ap: argparse.ArgumentParser) -> None:
    """The cache folder and bench_detect's grid options (the cells ``cached_cells`` reads)."""
    ap.add_argument("--cache", required=True, help="folder for the per-cell audits (reused)")
    add_grid_options(ap)
    ap.add_argument(
        "--captions-per-image", type=int, default=1, help="synthetic geometries: rows a photo"
    )
    ap.add_argument(
        "--no-val",
        action="store_true",
        help="audit without the validation set (self-influence, no trusted_loss); "
        "use a cache folder of its own",
    )


def add_grid_options(ap: argparse.ArgumentParser) -> None:
    """bench_detect's grid: geometries, noise kinds, seeds, sizes, width, noise rate, skew."""
    ap.add_argument(
        "--geometries",
        nargs="+",
        default=list(GEOMETRIES),
        choices=GEOMETRIES + HELD_OUT + tuple(LATENT_GEOMETRIES),
    )
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS + EMBEDDING_KINDS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--class-skew", type=float, default=0.0, help="long-tailed classes")


def grid_rows(args, one_cell) -> list[dict]:
    """``one_cell(geometry, kind, seed, args)``'s rows over the grid in ``args``, in order,
    printing each cell-seed as it is done."""
    t0, rows = time.time(), []
    for geometry in args.geometries:
        for kind in args.kinds:
            for seed in range(args.seeds):
                rows += one_cell(geometry, kind, seed, args)
                print(f"done {geometry} {kind} seed={seed} ({time.time() - t0:.0f} s)", flush=True)
    return rows


def cached_cells(args):
    """(geometry, kind, seed, path, Cell) for every cell of the grid in ``args``; a cell not
    yet in ``args.cache`` is audited and saved first."""
    folder = Path(args.cache)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for geometry in args.geometries:
        for kind in args.kinds:
            for seed in range(args.seeds):
                path = folder / f"{geometry}_{kind}_{seed}.npz"
                if not path.exists():
                    cache_cell(path, geometry, kind, seed, args)
                    print(f"audited {geometry} {kind} seed={seed} ({time.time() - t0:.0f} s)")
                with np.load(path) as data:
                    cached = {k: data[k] for k in data.files}
                yield geometry, kind, seed, path, Cell(cached)
