"""Continual learning with DEN-style splits: euclidean vs angular drift, two split rules.

Default regime (issue 18), the papers' one as far as nothing is downloaded: 784-d inputs
(scikit-learn's bundled 8x8 digits upsampled to 20x20 and centred in 28x28, as MNIST), DEN's
312-128 hidden layers, 4 permuted tasks, and an L1 threshold (3e-4 per step) strong enough that
a real share of the weights is exactly zero (reported). Arms per seed:

- ``none``: no split (it also measures drift against damage, before each would-be split);
- ``euclidean`` / ``angular`` / ``random``: the top-m MOST drifted moved units per layer, at a
  matched m (our design, so that criteria add the same number of units);
- ``den-euclidean`` / ``den-angular``: DEN's own rule, as its public code does it: units with
  drift over the threshold, the LEAST drifted first, at most k = 10 per layer. Euclidean uses
  DEN's 0.05; the angular threshold (on another scale) is calibrated on a seed outside the
  evaluated ones so that the same share of moved units is over it (``--thr-angular`` fixes it);
- ``all`` (optional): every moved unit, the zero-forgetting bound.

Reports average test accuracy after the last task, backward transfer, stored and non-zero
parameters, the share of exactly-zero live weights, with 95% bootstrap intervals over seeds;
paired differences; Spearman of each drift score with a unit's damage to the old tasks; the
split gain of the units each rule picks; the damage of a pure rescaling (angle 0).

    python benchmarks/bench_continual.py --workers 1   # the defaults: 10 seeds, 13-18 min
    python benchmarks/bench_continual.py --seeds 2 --steps 10 --workers 1   # smoke run
    python benchmarks/bench_continual.py --data digits8 --hidden 100 50 --l1 1e-5 --steps 300 \\
        --tasks 5 --seeds 5 --m 5 20 --seqs permuted split --methods none all euclidean angular \\
        random --corr-units 0   # the 64-d setting of issue 8
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from ecif.companions.continual import (
    DENConfig,
    DENLearner,
    choose_splits,
    digits28_xy,
    digits_xy,
    incoming,
    permuted_tasks,
    rescale_damage,
    restore_damage,
    split_gain,
    split_tasks,
)
from ecif.companions.continual.drift import drift_scores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual_report import MATCHED, SCORED, boot, fmt, report  # noqa: E402

__all__ = ["boot", "fmt", "main", "run", "run_one"]

CAL_SEED = 1000  # calibration seed for the angular threshold, not among the evaluated ones
DEN_THRESHOLD = 0.05  # DEN's split threshold (Euclidean)


def make_tasks(seq: str, seed: int, data: str = "digits28", n_tasks: int = 4):
    x, y = digits28_xy() if data == "digits28" else digits_xy()
    if seq == "permuted":
        return permuted_tasks(x, y, n_tasks, seed=seed)
    groups = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)][:n_tasks]
    return split_tasks(x, y, groups, seed=seed)


def config_for(job: dict) -> DENConfig:
    """The learner settings of one arm; DEN's published defaults for everything not named."""
    meth = job["method"]
    base = dict(
        hidden=job["hidden"], steps=job["steps"], seed=job["seed"], pull=job["pull"], l1=job["l1"]
    )
    if meth in MATCHED:
        return DENConfig(**base, split_top_m=job["m"], drift=meth)
    if meth.startswith("den-"):
        crit = meth[4:]
        return DENConfig(
            **base,
            drift=crit,
            split_top_m=None,
            split_threshold=job["thresholds"][crit],
            split_pick="least",
        )
    return DENConfig(**base, split_top_m={"none": 0, "all": 10**9}[meth])


def zero_share(learner: DENLearner) -> list[float]:
    """Per layer, the share of exactly-zero weights among those the last task uses."""
    net, last = learner.net, learner.net.n_tasks - 1
    out = []
    for i, lay in enumerate(net.layers):
        cols = torch.arange(net.in_dim) if i == 0 else net.alive(i - 1, last)
        w = lay.weight[net.alive(i, last)][:, cols]
        out.append(float((w == 0).float().mean()))
    return out


def pick_rules(job: dict, cap: int) -> dict[str, tuple[str, int | None, float, str]]:
    """(criterion, top_m, threshold, pick) of each split rule whose picks are measured."""
    rules = {f"{c} top {job['pick_m']}": (c, job["pick_m"], 0.0, "most") for c in MATCHED}
    for crit, thr in job["thresholds"].items():
        rules[f"DEN rule {crit}"] = (crit, None, thr, "least")
    return rules


def measure_hook(job: dict, val_sets, corr: list[dict]):
    """Before each split of a no-split run: Spearman of drift vs damage on a sample of the moved
    units, and the split gain of the units each rule would pick."""
    seed, cap = job["seed"], DENConfig().expand_k

    def measure(lrn: DENLearner, task: int, snap, rep) -> None:
        gen = torch.Generator().manual_seed(1000 * seed + task)
        sub = torch.Generator().manual_seed(7919 * seed + task)
        sets = val_sets[:task]
        for layer, cand in enumerate(rep.candidates):
            n = int(cand.numel())
            if n < 5:
                continue
            old, new = incoming(lrn.net, snap, layer, cand, False)
            scores = {c: drift_scores(old, new, c, gen) for c in SCORED}
            k = job["corr_units"]
            sample = torch.arange(n) if k <= 0 or n <= k else torch.randperm(n, generator=sub)[:k]
            sample = sample.sort().values
            picks = {
                name: choose_splits(scores[c], top_m, thr, cap, pick)
                for name, (c, top_m, thr, pick) in pick_rules(job, cap).items()
            }
            need = torch.cat([sample, *picks.values()]).unique()
            gain = split_gain(lrn.net, snap, layer, cand[need], sets, task).numpy()
            at = {int(p): i for i, p in enumerate(need.tolist())}
            g_s = gain[[at[int(p)] for p in sample]]
            dmg = restore_damage(lrn.net, snap, layer, cand[sample], sets).numpy()
            row = {"task": task, "layer": layer, "n": n, "n_sampled": int(sample.numel())}
            row |= {"dmg": float(dmg.mean()), "gain": float(g_s.mean())}
            for c in SCORED:
                s = scores[c][sample].numpy()
                row[c] = float(spearmanr(s, dmg).statistic)
                row[c + "|split"] = float(spearmanr(s, g_s).statistic)
            for name, p in picks.items():
                vals = [gain[at[int(q)]] for q in p]
                row["pick:" + name] = float(np.mean(vals)) if vals else float("nan")
            corr.append(row)

    return measure


def run_one(job: dict) -> dict:
    """One (sequence, seed, arm) run; the no-split run also measures drift vs damage."""
    torch.set_num_threads(1)
    tasks = make_tasks(job["seq"], job["seed"], job["data"], job["tasks"])
    cfg = config_for(job)
    learner = DENLearner(tasks[0].x_train.shape[1], cfg)
    corr: list[dict] = []
    val_sets = [(t.x_val, t.y_val) for t in tasks]
    hook = measure_hook(job, val_sets, corr) if job["method"] == "none" else None
    t0 = time.time()
    just_learned = []
    for t, task in enumerate(tasks):
        learner.learn_task(task.x_train, task.y_train, task.n_classes, before_split=hook)
        just_learned.append(learner.evaluate(task.x_test, task.y_test, t)[0])
    final = [learner.evaluate(tk.x_test, tk.y_test, t)[0] for t, tk in enumerate(tasks)]
    out = {k: job[k] for k in ("seq", "seed", "method", "m")} | {
        "acc": float(np.mean(final)),
        "bwt": float(np.mean([f - a for f, a in zip(final[:-1], just_learned[:-1])])),
        "params": learner.net.n_params(),
        "nonzero": learner.net.n_nonzero(),
        "zero_share": zero_share(learner),
        "units": sum(learner.net.unit_counts()),
        "split": sum(len(s) for r in learner.reports for s in r.split),
        "zero_in": zero_incoming_units(learner),
        "corr": corr,
    }
    if job["method"] == "none":
        out["rescale"] = rescale_probe(learner, val_sets, job["seed"])
    out["seconds"] = time.time() - t0
    return out


def calibrate_angular(job: dict, thr_euclidean: float) -> tuple[float, float]:
    """Angular threshold with the same share of moved units over it as ``thr_euclidean``
    (pooled over tasks and layers of a no-split run); returns (threshold, share)."""
    torch.set_num_threads(1)
    tasks = make_tasks(job["seq"], CAL_SEED, job["data"], job["tasks"])
    cfg = config_for(job | {"method": "none", "seed": CAL_SEED})
    learner = DENLearner(tasks[0].x_train.shape[1], cfg)
    eu, an = [], []

    def collect(lrn: DENLearner, task: int, snap, rep) -> None:
        for layer, cand in enumerate(rep.candidates):
            old, new = incoming(lrn.net, snap, layer, cand, False)
            eu.append(drift_scores(old, new, "euclidean"))
            an.append(drift_scores(old, new, "angular"))

    for task in tasks:
        learner.learn_task(task.x_train, task.y_train, task.n_classes, before_split=collect)
    e, a = torch.cat(eu).double(), torch.cat(an).double()
    share = float((e > thr_euclidean).double().mean())
    return float(torch.quantile(a, 1.0 - share)), share


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50, help="Adam steps per phase")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--data", choices=["digits28", "digits8"], default="digits28")
    ap.add_argument("--hidden", type=int, nargs="+", default=[312, 128])
    ap.add_argument("--m", type=int, nargs="+", default=[10], help="matched top-m per layer")
    ap.add_argument("--seqs", nargs="+", default=["permuted"])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["none", "euclidean", "angular", "random", "den-euclidean", "den-angular"],
    )
    ap.add_argument("--workers", type=int, default=1, help="processes (figures do not change)")
    ap.add_argument("--pull", type=float, default=0.5, help="L2 pull to old weights (DEN: 0.5)")
    ap.add_argument("--l1", type=float, default=3e-4, help="L1 proximal step (DEN: 1e-5)")
    ap.add_argument("--thr-euclidean", type=float, default=DEN_THRESHOLD)
    ap.add_argument("--thr-angular", type=float, default=None, help="default: calibrated")
    ap.add_argument("--corr-units", type=int, default=48, help="units sampled per layer, 0 = all")
    return ap


def run(args: argparse.Namespace) -> tuple[list[dict], str]:
    """All runs of one command line and their tables (no timings, so reruns compare equal)."""
    seeds = list(range(args.seeds))
    base = dict(
        steps=args.steps,
        tasks=args.tasks,
        data=args.data,
        hidden=tuple(args.hidden),
        pull=args.pull,
        l1=args.l1,
        corr_units=args.corr_units,
        pick_m=args.m[0],
    )
    thresholds, head = {}, []
    for q in args.seqs:
        thr = {"euclidean": args.thr_euclidean}
        if args.thr_angular is not None:
            thr["angular"] = args.thr_angular
        else:
            thr["angular"], share = calibrate_angular(base | {"seq": q}, args.thr_euclidean)
            head.append(
                f"{q}: angular threshold {thr['angular']:.4g} puts the same share of moved units "
                f"({100 * share:.1f} %) over it as Euclidean {args.thr_euclidean:g} "
                f"(no-split run, seed {CAL_SEED})"
            )
        thresholds[q] = thr
    arms = [(meth, m) for meth in args.methods for m in (args.m if meth in MATCHED else [0])]
    jobs = [
        base | {"seq": q, "seed": s, "method": meth, "m": m, "thresholds": thresholds[q]}
        for q in args.seqs
        for s in seeds
        for meth, m in arms
    ]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(run_one, jobs))
    else:
        results = [run_one(j) for j in jobs]
    cap = DENConfig().expand_k
    text = report(results, args.seqs, seeds, arms, thresholds, args.tasks, cap)
    return results, "\n".join(head) + "\n" + text


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    results, text = run(args)
    print(
        f"{len(results)} runs, {time.time() - t0:.0f} s wall, data {args.data}, hidden "
        f"{args.hidden}, steps/phase {args.steps}, pull {args.pull}, l1 {args.l1}, published "
        "DEN defaults otherwise"
    )
    secs = {m: np.mean([r["seconds"] for r in results if r["method"] == m]) for m in args.methods}
    print("mean seconds per run: " + ", ".join(f"{m} {v:.0f}" for m, v in secs.items()))
    print(text)


if __name__ == "__main__":
    main()
