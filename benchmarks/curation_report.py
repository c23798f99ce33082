"""Tables, intervals, a plain verdict and an SVG figure for bench_curation.py's runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

METRICS = ("zero_shot_acc", "i2t_r@1", "t2i_r@1", "i2t_r@5", "t2i_r@5")
CEILING = "oracle"


def t_interval(values) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval over seeds (NaN bounds with one seed)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - h, m + h


def fmt(m: float, lo: float, hi: float) -> str:
    return f"{m:.3f}" if np.isnan(lo) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _label(f: str, b: str) -> str:
    return f if f in ("none", CEILING) else f"{f} @{b}"


def gap_share(runs: pd.DataFrame, primary: str):
    """share(values): the part of the none->oracle gap in ``primary`` that the mean of
    ``values`` closes (NaN when the oracle is no better than no filtering)."""
    base = runs.loc[runs["filter"] == "none", primary].mean()
    gap = runs.loc[runs["filter"] == CEILING, primary].mean() - base
    return lambda values: (float(np.mean(values)) - base) / gap if gap > 0 else np.nan


def regime_table(
    runs: pd.DataFrame, primary: str = "zero_shot_acc"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per (filter, budget): metrics with intervals, the paired difference in the
    ``primary`` metric against no filtering, and the share of the none->oracle gap closed."""
    base = runs[runs["filter"] == "none"].set_index("seed")
    share = gap_share(runs, primary)
    rows, raw = [], []
    for (f, b), g in runs.groupby(["filter", "budget"], sort=False):
        g = g.set_index("seed")
        diff = g[primary] - base.loc[g.index, primary]
        closed = share(g[primary])  # NaN: no gap to close, the share means nothing
        row = {
            "filter": _label(f, b),
            "kept": f"{g['kept'].mean():.0f}",
            "noisy kept": f"{g['noisy_kept'].mean():.0f}",
        }
        for m in METRICS:
            row[m] = fmt(*t_interval(g[m]))
        row[f"{primary} vs none (paired)"] = fmt(*t_interval(diff))
        row["gap closed"] = (
            "" if f in ("none", CEILING) else "n/a" if np.isnan(closed) else f"{closed:.0%}"
        )
        rows.append(row)
        raw.append({"filter": f, "budget": b, "acc": g[primary].mean(), "closed": closed})
    return pd.DataFrame(rows), pd.DataFrame(raw)


def verdict(runs: pd.DataFrame, primary: str = "zero_shot_acc") -> list[str]:
    """Plain sentences, one per ecif mode and budget: is it better than the best other
    (non-oracle, non-ecif) filter, by how much with a paired interval over seeds, and does it
    close half of the none->oracle gap? ``runs``: one regime's rows."""
    share = gap_share(runs, primary)
    out = []
    filtered = runs[~runs["filter"].isin(["none", CEILING])]
    for b, g in filtered.groupby("budget", sort=False):
        per = {f: r.set_index("seed")[primary] for f, r in g.groupby("filter", sort=False)}
        others = {f: v for f, v in per.items() if not f.startswith("ecif")}
        if not others:
            continue
        rival = max(others, key=lambda f: others[f].mean())
        for mine in (f for f in per if f.startswith("ecif")):
            v = per[mine]
            closed = share(v)
            if np.isnan(closed):
                out.append(
                    f"- budget {b}: the oracle is no better than no filtering here, so there is "
                    f"no gap to close; {mine}: {v.mean():.3f}, best other filter: {rival} "
                    f"({others[rival].mean():.3f})."
                )
                continue
            m, lo, hi = t_interval(v - others[rival].loc[v.index])
            ahead = m > 0
            noise = "" if np.isnan(lo) else " (within noise)" if lo <= 0 <= hi else ""
            out.append(
                f"- budget {b}: {mine} {v.mean():.3f} vs the best other filter by {primary}, "
                f"{rival}, {others[rival].mean():.3f}: paired difference {fmt(m, lo, hi)}"
                f"{noise}; closes {closed:.0%} of the none->oracle gap. Goal (best and >= 50%): "
                f"{'met' if ahead and closed >= 0.5 else 'NOT met'}"
                + ("" if ahead else f" ({rival} is better)")
                + ("" if closed >= 0.5 else "; less than half the gap")
                + ("; the lead is within noise" if ahead and noise else "")
                + "."
            )
    return out


def report(runs: pd.DataFrame, det: pd.DataFrame, params: dict, seconds: float) -> str:
    lines = []
    if params.get("quick"):
        lines += ["**Smoke run (--quick): tiny sizes, few steps. Not a result.**", ""]
    keys = ("dataset", "n", "noise", "n_val", "n_test", "seeds", "steps", "batch_size", "lr")
    keys += ("model", "primary")
    lines.append("Settings: " + ", ".join(f"{k}={params.get(k)}" for k in keys))
    if params.get("report"):
        lines.append(
            f"Training time: {seconds:.0f} s summed over {len(runs)} trainings (joined runs)."
        )
    else:
        lines.append(f"Wall time: {seconds:.0f} s ({len(runs)} trainings).")
    lines += ["", "### Detection: average precision against the planted noise", ""]
    g = det.groupby("filter", sort=False)["ap"]
    lines.append(markdown(pd.DataFrame({"filter": g.mean().index, "AP": [
        fmt(*t_interval(v)) for _, v in g]})))  # fmt: skip
    if runs.empty:  # --detect-only: no trainings
        return "\n".join([*lines, "", "Intervals: 95% Student-t over seeds."]) + "\n"
    for regime, r in runs.groupby("regime", sort=False):
        primary = params.get("primary", "zero_shot_acc")
        table, _ = regime_table(r, primary)
        lines += [
            "",
            f"### {regime}: trained on the kept pairs, tested on clean held-out pairs",
            "",
        ]
        lines.append(markdown(table))
        lines += ["", *verdict(r, primary)]
    lines += [
        "",
        "Intervals: 95% Student-t over seeds; 'vs none (paired)': per-seed difference from no "
        "filtering with the same seed. 'gap closed': (filter - none) / (oracle - none) in the "
        f"mean of {params.get('primary', 'zero_shot_acc')}. @1x / @2x: drops the true noise count / twice it.",
    ]
    return "\n".join(lines) + "\n"


def svg_figure(runs: pd.DataFrame, metric: str = "zero_shot_acc") -> str:
    """Horizontal bars (mean, 95% interval) of ``metric`` per filter, one panel per regime."""
    regimes = list(dict.fromkeys(runs["regime"]))
    groups = list(dict.fromkeys(zip(runs["filter"], runs["budget"])))
    bar_h, left, width, top = 14, 170, 360, 28
    panel_h = top + bar_h * len(groups) + 24
    hi = float(runs[metric].max()) * 1.1 or 1.0
    parts = []
    for p, regime in enumerate(regimes):
        y0 = p * panel_h
        parts.append(f'<text x="{left}" y="{y0 + 18}" font-weight="bold">{regime}: {metric}</text>')
        r = runs[runs["regime"] == regime]
        for i, (f, b) in enumerate(groups):
            v = r[(r["filter"] == f) & (r["budget"] == b)][metric]
            if v.empty:
                continue
            m, lo, hi_ci = t_interval(v)
            y = y0 + top + i * bar_h
            colour = (
                "#c0392b"
                if f.startswith("ecif")
                else "#7f8c8d"
                if f in ("none", CEILING)
                else "#2980b9"
            )
            parts.append(
                f'<text x="{left - 6}" y="{y + 10}" text-anchor="end">{_label(f, b)}</text>'
            )
            parts.append(
                f'<rect x="{left}" y="{y + 2}" width="{width * m / hi:.1f}" height="{bar_h - 4}" fill="{colour}"/>'
            )
            if not np.isnan(lo):
                x1, x2 = (left + width * min(max(v / hi, 0.0), 1.0) for v in (lo, hi_ci))
                parts.append(
                    f'<line x1="{x1:.1f}" x2="{x2:.1f}" y1="{y + 7}" y2="{y + 7}" stroke="black"/>'
                )
            parts.append(f'<text x="{left + width * m / hi + 4:.1f}" y="{y + 10}">{m:.3f}</text>')
    h = panel_h * len(regimes)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{h}" '
        f'font-family="sans-serif" font-size="11">' + "".join(parts) + "</svg>\n"
    )  # fmt: skip
