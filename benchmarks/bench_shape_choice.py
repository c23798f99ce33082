"""Per audit, choose how ``misalign_score`` ranks: the default (the mixture's log-odds plus the
probe-weighted features) or the probe-weighted features alone, by a measurement on the twin.

    python benchmarks/bench_shape_choice.py --geometries shapes --kinds mixed --n 3000 --n-val 600 --seeds 5
    python benchmarks/bench_shape_choice.py

Why: on an encoder trained on the data (the demo) the mixture's quadratic log-odds ranks below
``clip_score``, and the probes' weights alone rank above it, but alone they lose on other
geometries (benchmarks/README.md, "The mixture's shape"). If the twin could tell which of the
two ranks its own rows better, the choice could be made per audit. Two criteria, each
cross-fitted over 5 folds of the twin's labelled rows (the probes' direction refit without the
held fold, ``probe_regression.probe_direction``):

- held clean rows: the AUC of the twin's real rows (the set itself, with its noise) over held
  validation pairs (known clean): a positive-unlabelled measure of the set's own noise;
- planted probes: the AUC of held probes over held clean rows.

The features alone are chosen when the criterion's mean per-row gain over the default exceeds
``--z`` standard errors. Every cell-seed is audited once with DEFAULT options; printed: mean
AP per cell of the default, the features alone and each choice (and how often it chose the
features), then each minus the default per seed with a 95% interval over seeds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from bench_detect import make_sets
from scipy import stats
from trial_cells import add_grid_options, grid_rows

import ecif
from ecif.audit.combine import fit_mixture
from ecif.audit.metrics import ranking_metrics
from ecif.audit.misalign import misalign_scores, signal_suspicions, twin_score
from ecif.audit.probe_regression import probe_direction

FOLDS = 5


def share_above(score: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """For each ``lower`` row, the share of ``upper`` rows scored above it (ties half): its
    term of the AUC of ``upper`` over ``lower``."""
    ranked = np.sort(score[upper])
    lo = np.searchsorted(ranked, score[lower], "left")
    hi = np.searchsorted(ranked, score[lower], "right")
    return 1.0 - (lo + 0.5 * (hi - lo)) / len(ranked)


def folds(
    mix, twin: dict, is_probe: np.ndarray, is_clean: np.ndarray, hedge: bool, hold_probes: bool
):
    """Per fold: the held rows, and every twin row scored by the default and by the features
    alone with the probes' direction refit without them. The folds hold clean rows, and
    probes too when ``hold_probes`` (otherwise every fit has all of them)."""
    feats = mix.features(twin)
    ok = np.isfinite(feats).all(axis=1)
    labelled = np.flatnonzero(((is_probe & hold_probes) | is_clean) & ok)
    fold = np.random.default_rng(0).permutation(len(labelled)) % FOLDS
    for k in range(FOLDS):
        held = np.zeros(len(ok), dtype=bool)
        held[labelled[fold == k]] = True
        fit = (is_probe | is_clean) & ok & ~held
        w, _ = probe_direction(feats[fit], is_probe[fit])
        yield held, twin_score(mix, twin, w, hedge, alone=False), feats @ w, ok


def mean_and_se(terms: list[np.ndarray]) -> tuple[float, float]:
    gain = np.concatenate(terms)
    return float(gain.mean()), float(gain.std(ddof=1) / np.sqrt(len(gain)))


def choices(table: pd.DataFrame, n_norm: float, probes) -> dict:
    """The default's and the features' scores, and each criterion's (gain, standard error)."""
    default, record, _ = misalign_scores(table, "auto", n_norm, probes)
    out = {"default": default, "features alone": default, "criteria": {}}
    pw = record.get("probe_weights")
    if pw is None or pw.get("alone_because") or probes.is_clean is None:
        return out  # no twin, or the features already rank alone: nothing to choose
    sus = signal_suspicions(table, n_norm)
    mix = fit_mixture(sus)
    out["features alone"] = mix.features(sus) @ np.asarray(pw["weights"])
    is_probe = np.asarray(probes.is_probe, dtype=bool)
    is_clean = np.asarray(probes.is_clean, dtype=bool)
    args = (mix, probes.suspicions, is_probe, is_clean, "hedge" in record)
    terms = []  # held clean rows: the real rows above each held clean row, every probe fit
    for held, dflt, alone, ok in folds(*args, hold_probes=False):
        real = ~is_probe & ~is_clean & ok
        terms.append(share_above(alone, real, held) - share_above(dflt, real, held))
    out["criteria"]["held clean rows"] = mean_and_se(terms)
    terms = []  # planted probes: the held clean rows above each held probe (fewer is better)
    for held, dflt, alone, _ in folds(*args, hold_probes=True):
        clean, probe = held & is_clean, held & is_probe
        terms.append(share_above(dflt, clean, probe) - share_above(alone, clean, probe))
    out["criteria"]["planted probes"] = mean_and_se(terms)
    return out


def one_cell(geometry: str, kind: str, seed: int, args) -> list[dict]:
    train, val, labels = make_sets(
        geometry, kind, args.noise, seed, args.n, args.n_val, args.d, args.class_skew
    )
    aud = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed))
    table = aud.run()
    n_norm = float(np.mean([h.n_norm for h in aud.heads]))
    got = choices(table, n_norm, aud.probes)
    np.testing.assert_allclose(got["default"], table["misalign_score"], rtol=1e-5, atol=1e-5)
    ap = {k: ranking_metrics(labels, got[k])["ap"] for k in ("default", "features alone")}
    rows = [dict(method=k, ap=v, chose=np.nan) for k, v in ap.items()]
    for name in ("held clean rows", "planted probes"):
        gain, se = got["criteria"].get(name, (0.0, np.inf))
        pick = gain > args.z * se
        rows.append(
            dict(
                method=f"chosen by {name}",
                ap=ap["features alone" if pick else "default"],
                chose=pick,
            )
        )
    return [dict(geometry=geometry, kind=kind, seed=seed, **r) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_options(ap)
    ap.add_argument("--z", type=float, default=1.0, help="standard errors a choice must clear")
    args = ap.parse_args()
    t0 = time.time()
    df = pd.DataFrame(grid_rows(args, one_cell))
    cells = df.groupby(["geometry", "kind", "method"], sort=False)["ap"].mean().unstack()
    chose = df.dropna(subset=["chose"]).groupby("method")["chose"].agg(["sum", "count"])
    print(cells.round(4).to_string())
    per_seed = df.groupby(["seed", "method"])["ap"].mean().unstack()
    print(
        "\n| ranking | mean AP | minus the default, per seed | 95% interval | chose the features |"
    )
    print("|---|---|---|---|---|")
    for name in per_seed.columns:
        d = per_seed[name] - per_seed["default"]
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0
        n = (
            f"{int(chose.loc[name, 'sum'])} of {int(chose.loc[name, 'count'])}"
            if name in chose.index
            else ""
        )
        print(
            f"| {name} | {per_seed[name].mean():.4f} | "
            + ", ".join(f"{v:+.4f}" for v in d)
            + f" | [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] | {n} |"
        )
    print(f"{len(df) // len(per_seed.columns)} cell-seeds, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
