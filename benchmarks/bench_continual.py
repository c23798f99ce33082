"""Continual learning with DEN-style splits: euclidean vs angular vs random drift criteria.

Task sequences: permuted digits (5 tasks, 10 classes, a fixed pixel permutation each) and split
digits (5 tasks of 2 classes), from scikit-learn's bundled 8x8 digits. Per seed and sequence,
runs the learner with no split, with every moved unit split ("all", the zero-forgetting upper
bound at the largest size), and with the top-m units per layer split by each criterion at a
MATCHED m. Reports average test accuracy over tasks after the last one, backward transfer
(mean accuracy change of old tasks since they were learned) and stored parameters, with 95%
bootstrap intervals over seeds; paired differences angular - euclidean; the Spearman
correlation of each drift score with the old-task damage of the unit (no-split runs, before
each split); and the old-task damage of a pure rescaling of a unit (angular drift exactly 0).

    python benchmarks/bench_continual.py --seeds 5 --steps 300 --m 5 20   # ~40 min, 2 cores
    python benchmarks/bench_continual.py --seeds 2 --steps 100   # smoke run
    python benchmarks/bench_continual.py --seeds 1 --steps 100 --l1 3e-3 --seqs split --m 5
        # ~40 s; half the units end with all-zero incoming weights (chance accuracy: a
        # crash check, not a result); crashed in the rescaling probe before issue 18
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from scipy.stats import spearmanr

from ecif.companions.continual import (
    DENConfig,
    DENLearner,
    digits_xy,
    incoming,
    permuted_tasks,
    rescale_damage,
    restore_damage,
    split_gain,
    split_tasks,
)
from ecif.companions.continual.drift import drift_scores

CRITERIA = ("euclidean", "angular", "random")
SCORED = ("euclidean", "angular", "random", "scale")


def make_tasks(seq: str, seed: int):
    x, y = digits_xy()
    if seq == "permuted":
        return permuted_tasks(x, y, 5, seed=seed)
    return split_tasks(x, y, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)], seed=seed)


def run_one(job: tuple) -> dict:
    """One (sequence, seed, method, m) run; the no-split run also measures drift vs damage."""
    seq, seed, method, m, steps, hidden, pull, l1 = job
    torch.set_num_threads(1)
    tasks = make_tasks(seq, seed)
    crit = method if method in CRITERIA else "euclidean"
    top_m = {"none": 0, "all": 10**9}.get(method, m)
    cfg = DENConfig(
        hidden=hidden, steps=steps, split_top_m=top_m, drift=crit, seed=seed, pull=pull, l1=l1
    )
    learner = DENLearner(tasks[0].x_train.shape[1], cfg)
    corr: list[dict] = []
    val_sets = [(t.x_val, t.y_val) for t in tasks]

    def measure(lrn: DENLearner, task: int, snap, rep) -> None:
        gen = torch.Generator().manual_seed(1000 * seed + task)
        for layer, cand in enumerate(rep.candidates):
            if cand.numel() < 5:
                continue
            old, new = incoming(lrn.net, snap, layer, cand, cfg.drift_include_bias)
            dmg = restore_damage(lrn.net, snap, layer, cand, val_sets[:task]).numpy()
            gain = split_gain(lrn.net, snap, layer, cand, val_sets[:task], task).numpy()
            row = {"task": task, "layer": layer, "n": int(cand.numel()), "dmg": float(dmg.mean())}
            row["gain"] = float(gain.mean())
            for c in SCORED:
                s = drift_scores(old, new, c, gen).numpy()
                row[c] = float(spearmanr(s, dmg).statistic)
                row[c + "|split"] = float(spearmanr(s, gain).statistic)
            corr.append(row)

    t0 = time.time()
    just_learned = []
    for t, task in enumerate(tasks):
        hook = measure if method == "none" else None
        learner.learn_task(task.x_train, task.y_train, task.n_classes, before_split=hook)
        just_learned.append(learner.evaluate(task.x_test, task.y_test, t)[0])
    final = [learner.evaluate(tk.x_test, tk.y_test, t)[0] for t, tk in enumerate(tasks)]
    out = {
        "seq": seq,
        "seed": seed,
        "method": method,
        "m": m,
        "acc": float(np.mean(final)),
        "bwt": float(np.mean([f - a for f, a in zip(final[:-1], just_learned[:-1])])),
        "params": learner.net.n_params(),
        "nonzero": learner.net.n_nonzero(),
        "units": sum(learner.net.unit_counts()),
        "split": sum(len(s) for r in learner.reports for s in r.split),
        "zero_in": zero_incoming_units(learner),
        "seconds": time.time() - t0,
        "corr": corr,
    }
    if method == "none":
        out["rescale"] = rescale_probe(learner, val_sets, seed)
    return out


def zero_incoming_units(learner: DENLearner) -> int:
    """Units used by the last task whose incoming weights are all exactly zero (dead units)."""
    net, last = learner.net, learner.net.n_tasks - 1
    return sum(
        int((net.layers[i].weight[net.alive(i, last)] == 0).all(1).sum())
        for i in range(len(net.layers))
    )


def rescale_probe(learner: DENLearner, sets, seed: int) -> dict:
    """Damage of x0.5 / x2 rescalings (angular drift 0) next to damage of restoring drift.

    Units whose incoming weights are all zero are left out: they have no direction to keep, so
    rescaling them would only rescale the bias; a layer with none left reports NaN, which the
    bootstrap drops."""
    net, res = learner.net, {}
    gen = torch.Generator().manual_seed(seed)
    last = net.n_tasks - 1
    for layer in range(len(net.layers)):
        units = net.alive(layer, 0)
        units = units[(net.layers[layer].weight[units] != 0).any(1)]
        units = units[torch.randperm(units.numel(), generator=gen)[:30]]
        for f in (0.5, 2.0):
            d = rescale_damage(net, layer, units, f, sets[: last + 1])
            w = net.layers[layer].weight[units]
            assert bool((drift_scores(w, w * f, "angular") < 1e-6).all())
            res[f"L{layer}x{f}"] = float(d.mean()) if units.numel() else float("nan")
    return res


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


def report(results: list[dict], seqs, seeds, ms) -> str:
    lines = []
    by = {(r["seq"], r["seed"], r["method"], r["m"]): r for r in results}
    methods = [("none", 0), ("all", 0)] + [(c, m) for m in ms for c in CRITERIA]
    for seq in seqs:
        lines += [
            f"\n**{seq} digits** (5 tasks, {len(seeds)} seeds; accuracy and BWT in %)\n",
            "| split | m/layer | avg acc | BWT | params | nonzero | units split | zero-in units |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for meth, m in methods:
            rows = [by[(seq, s, meth, m)] for s in seeds]
            mm = "-" if meth in ("none", "all") else str(m)
            lines.append(
                f"| {meth} | {mm} | {fmt(boot([r['acc'] for r in rows]), 100)} | "
                f"{fmt(boot([r['bwt'] for r in rows]), 100)} | "
                f"{np.mean([r['params'] for r in rows]):.0f} | "
                f"{np.mean([r['nonzero'] for r in rows]):.0f} | "
                f"{np.mean([r['split'] for r in rows]):.0f} | "
                f"{np.mean([r['zero_in'] for r in rows]):.1f} |"
            )
        lines += ["", "| paired difference (per seed) | m | avg acc | BWT |", "|---|---|---|---|"]
        for m in ms:
            for a, b in (("angular", "euclidean"), ("angular", "random"), ("euclidean", "random")):
                d_acc = [by[(seq, s, a, m)]["acc"] - by[(seq, s, b, m)]["acc"] for s in seeds]
                d_bwt = [by[(seq, s, a, m)]["bwt"] - by[(seq, s, b, m)]["bwt"] for s in seeds]
                lines.append(
                    f"| {a} - {b} | {m} | {fmt(boot(d_acc), 100)} | {fmt(boot(d_bwt), 100)} |"
                )
        corr = [c | {"seed": s} for s in seeds for c in by[(seq, s, "none", 0)]["corr"]]
        lines += [
            "",
            "| Spearman(drift score, damage), no-split runs | layer | " + " | ".join(SCORED) + " |",
            "|---|---|" + "---|" * len(SCORED),
        ]
        for kind, suffix in (("restore incoming", ""), ("split alone", "|split")):
            for layer in sorted({c["layer"] for c in corr}):
                cells = []
                for crit in SCORED:
                    per_seed = [
                        np.mean(
                            [
                                c[crit + suffix]
                                for c in corr
                                if c["seed"] == s and c["layer"] == layer
                            ]
                        )
                        for s in seeds
                    ]
                    cells.append(fmt(boot(per_seed)))
                n = np.mean([c["n"] for c in corr if c["layer"] == layer])
                lines.append(
                    f"| {kind} ({n:.0f} moved units) | {layer} | " + " | ".join(cells) + " |"
                )
        resc = [by[(seq, s, "none", 0)]["rescale"] for s in seeds]
        lines += [
            "",
            "| pure rescaling (angular drift = 0) | old-task loss increase |",
            "|---|---|",
        ]
        for layer in sorted({c["layer"] for c in corr}):
            per_seed = [
                np.mean([c["dmg"] for c in corr if c["seed"] == s and c["layer"] == layer])
                for s in seeds
            ]
            lines.append(
                f"| for scale: restoring one moved L{layer} unit | {fmt(boot(per_seed), 1, 4)} |"
            )
        for key in resc[0]:
            lines.append(f"| {key} | {fmt(boot([r[key] for r in resc]), 1, 4)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, nargs="+", default=[100, 50])
    ap.add_argument("--m", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--seqs", nargs="+", default=["permuted", "split"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pull", type=float, default=0.5, help="L2 pull to old weights (DEN: 0.5)")
    ap.add_argument(
        "--l1", type=float, default=1e-5, help="L1 proximal threshold per step (DEN: 1e-5)"
    )
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    jobs = [(q, s, "none", 0) for q in args.seqs for s in seeds]
    jobs += [(q, s, "all", 0) for q in args.seqs for s in seeds]
    jobs += [(q, s, c, m) for q in args.seqs for s in seeds for m in args.m for c in CRITERIA]
    jobs = [j + (args.steps, tuple(args.hidden), args.pull, args.l1) for j in jobs]
    t0 = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run_one, jobs))
    print(
        f"{len(jobs)} runs, {time.time() - t0:.0f} s wall, steps/phase {args.steps}, "
        f"hidden {args.hidden}, pull {args.pull}, l1 {args.l1}, published DEN defaults otherwise"
    )
    print(report(results, args.seqs, seeds, args.m))


if __name__ == "__main__":
    main()
