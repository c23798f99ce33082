"""Markdown tables for bench_continual.py: bootstrap intervals over seeds, paired differences,
drift-damage correlations, the damage of each split rule's picks, and the rescaling probe."""

from __future__ import annotations

import numpy as np

SCORED = ("euclidean", "angular", "random", "scale")
MATCHED = ("euclidean", "angular", "random")
PAIRS = (
    ("angular", "euclidean"),
    ("angular", "random"),
    ("euclidean", "random"),
    ("den-angular", "den-euclidean"),
    ("den-euclidean", "euclidean"),
    ("den-angular", "angular"),
    ("den-euclidean", "random"),
    ("den-angular", "random"),
)


def boot(vals, n: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval over independent replicates (seeds)."""
    v = np.asarray(vals, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n, v.size))].mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def fmt(t: tuple[float, float, float], scale: float = 1.0, nd: int = 2) -> str:
    m, lo, hi = (scale * x for x in t)
    return f"{m:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"


def rule_name(method: str, m: int, thresholds: dict[str, float], cap: int) -> str:
    """How each arm picks its splits, for the table."""
    if method == "random":
        return f"{m} at random"
    if method in MATCHED:
        return f"top {m} most drifted"
    if method.startswith("den-"):
        return f"drift > {thresholds[method[4:]]:.4g}, <= {cap} least drifted"
    return {"none": "nothing", "all": "every moved unit"}[method]


def _per_seed(corr: list[dict], seeds, layer: int, key: str) -> list[float]:
    return [
        float(np.mean([c[key] for c in corr if c["seed"] == s and c["layer"] == layer] or [np.nan]))
        for s in seeds
    ]


def _arm_table(by, seq, seeds, arms, thresholds, cap) -> list[str]:
    lines = [
        "| split | rule | avg acc | BWT | params | nonzero | zero weights L0 / L1 (%) "
        "| units split | zero-in units |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for meth, m in arms:
        rows = [by[(seq, s, meth, m)] for s in seeds]
        z0 = fmt(boot([r["zero_share"][0] for r in rows]), 100, 1)
        z1 = fmt(boot([r["zero_share"][-1] for r in rows]), 100, 1)
        lines.append(
            f"| {meth} | {rule_name(meth, m, thresholds[seq], cap)} | "
            f"{fmt(boot([r['acc'] for r in rows]), 100)} | "
            f"{fmt(boot([r['bwt'] for r in rows]), 100)} | "
            f"{np.mean([r['params'] for r in rows]):.0f} | "
            f"{np.mean([r['nonzero'] for r in rows]):.0f} | {z0} / {z1} | "
            f"{np.mean([r['split'] for r in rows]):.1f} | "
            f"{np.mean([r['zero_in'] for r in rows]):.1f} |"
        )
    return lines


def _pair_table(by, seq, seeds, arms) -> list[str]:
    lines = ["", "| paired difference (per seed) | avg acc | BWT |", "|---|---|---|"]
    for a, b in PAIRS:
        ka = next(((x, m) for x, m in arms if x == a), None)
        kb = next(((x, m) for x, m in arms if x == b), None)
        if ka is None or kb is None:
            continue
        d_acc = [by[(seq, s) + ka]["acc"] - by[(seq, s) + kb]["acc"] for s in seeds]
        d_bwt = [by[(seq, s) + ka]["bwt"] - by[(seq, s) + kb]["bwt"] for s in seeds]
        lines.append(f"| {a} - {b} | {fmt(boot(d_acc), 100)} | {fmt(boot(d_bwt), 100)} |")
    return lines


def _corr_tables(corr, seeds, rules) -> list[str]:
    layers = sorted({c["layer"] for c in corr})
    lines = [
        "",
        "| Spearman(drift score, damage), no-split runs | layer | " + " | ".join(SCORED) + " |",
        "|---|---|" + "---|" * len(SCORED),
    ]
    for kind, suffix in (("restore incoming", ""), ("split alone", "|split")):
        for layer in layers:
            cells = [fmt(boot(_per_seed(corr, seeds, layer, c + suffix))) for c in SCORED]
            n = np.mean([c["n"] for c in corr if c["layer"] == layer])
            k = np.mean([c["n_sampled"] for c in corr if c["layer"] == layer])
            lines.append(
                f"| {kind} ({k:.0f} of {n:.0f} moved units) | {layer} | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        "| split gain of one unit (1e-3 nats), no-split runs | "
        + " | ".join(f"layer {la}" for la in layers)
        + " |",
        "|---|" + "---|" * len(layers),
    ]
    for key, name in [("gain", "a moved unit (random sample)")] + [
        ("pick:" + r, f"a unit {r} picks") for r in rules
    ]:
        cells = [fmt(boot(_per_seed(corr, seeds, la, key)), 1e3, 3) for la in layers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _rescale_table(by, corr, seq, seeds) -> list[str]:
    resc = [by[(seq, s, "none", 0)]["rescale"] for s in seeds]
    lines = ["", "| pure rescaling (angular drift = 0) | old-task loss increase |", "|---|---|"]
    for layer in sorted({c["layer"] for c in corr}):
        per_seed = _per_seed(corr, seeds, layer, "dmg")
        lines.append(
            f"| for scale: restoring one moved L{layer} unit | {fmt(boot(per_seed), 1, 4)} |"
        )
    for key in resc[0]:
        lines.append(f"| {key} | {fmt(boot([r[key] for r in resc]), 1, 4)} |")
    return lines


def report(results: list[dict], seqs, seeds, arms, thresholds, n_tasks: int, cap: int) -> str:
    """All tables, one block per task sequence; deterministic given ``results``."""
    lines = []
    by = {(r["seq"], r["seed"], r["method"], r["m"]): r for r in results}
    for seq in seqs:
        lines += [
            f"\n**{seq}** ({n_tasks} tasks, {len(seeds)} seeds; accuracy and BWT in %)\n",
            *_arm_table(by, seq, seeds, arms, thresholds, cap),
            *_pair_table(by, seq, seeds, arms),
        ]
        if ("none", 0) not in arms:
            continue
        corr = [c | {"seed": s} for s in seeds for c in by[(seq, s, "none", 0)]["corr"]]
        rules = list(dict.fromkeys(k[5:] for c in corr for k in c if k.startswith("pick:")))
        lines += _corr_tables(corr, seeds, rules) + _rescale_table(by, corr, seq, seeds)
    return "\n".join(lines)
