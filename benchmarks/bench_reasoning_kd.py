"""Validity-calibrated reasoning KD on addition by rewrites: deterministic, paired seeds.

An imperfect teacher (d=64; drops the carry on merges whose units sum to >= 16, 90 % of the
time) is distilled into students (d=32) warm-started per seed on gold traces. Arms:

- ``plain_fkl``: forward KL on half student / half teacher traces, w = 1.
- ``calibrated``: w = (1 + V_T - V_S) / 2 from freshly sampled teacher and student proposals
  at each step boundary (the issue-7 arm), applied to the trace's own step.
- ``own_step``: the trace's own step is its author's proposal; only the other model proposes,
  so the weight is computed from the step actually distilled.
- ``own_step_shuffled``: the same weights permuted within each batch (control).
- ``onpolicy_jsd``: student traces only, JSD(0.5), w = 1 (the strongest KD baseline).
- ``onpolicy_jsd_own``: the same with own-step calibration; ``onpolicy_jsd_shuffled`` its
  control.
- ``filtered_sft``: teacher traces kept only when every step checks and the answer is right.

A second setting has no per-step checker, only the final answer (run with --arms; not in the
default): ``own_step_mc`` and ``onpolicy_jsd_own_mc`` take V from --mc rollouts of the
teacher from prefix + step (the share reaching the gold answer), and ``answer_sft`` is the
baseline there, teacher traces kept when their answer is right.

Every arm of a seed starts from the same student and draws its problems, its prefix choices
(student or teacher trace) and its first traces from the same seeded generators; proposals
and shuffles use a separate generator. All draws are seeded, so the same command (same
--threads) prints the same figures, teacher included. Reports greedy answer accuracy and step
validity on 400 held-out problems, with paired differences and 95 % Student-t intervals.
Run: python benchmarks/bench_reasoning_kd.py (benchmarks/README.md records the run).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ecif.companions import tasks as T
from ecif.companions.reasoning_kd import (
    CalibratedKDConfig,
    build_calibrated_batch,
    calibrated_kd_loss,
    filter_answer_traces,
    filter_valid_traces,
    sample_traces,
)
from ecif.companions.toy_lm import TinyLM, freeze

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import TASK, make_lm, sft_step, train_sft  # noqa: E402
from curation_report import t_interval  # noqa: E402

C = CalibratedKDConfig
ARMS: dict[str, CalibratedKDConfig | str] = {  # a string: SFT on traces filtered by it
    "plain_fkl": C(weighting="none"),
    "calibrated": C(weighting="linear"),
    "own_step": C(proposals="own"),
    "own_step_shuffled": C(proposals="own", weighting="shuffled"),
    "onpolicy_jsd": C(weighting="none", divergence="jsd", student_prefix_frac=1.0),
    "onpolicy_jsd_own": C(divergence="jsd", student_prefix_frac=1.0, proposals="own"),
    "onpolicy_jsd_shuffled": C(
        divergence="jsd", student_prefix_frac=1.0, proposals="own", weighting="shuffled"
    ),
    "filtered_sft": "steps",
}
MC_ARMS: dict[str, CalibratedKDConfig | str] = {  # no per-step checker: answers only
    "own_step_mc": C(proposals="own", validity="rollout"),
    "onpolicy_jsd_own_mc": C(
        divergence="jsd", student_prefix_frac=1.0, proposals="own", validity="rollout"
    ),
    "answer_sft": "answer",
}
ALL_ARMS = {**ARMS, **MC_ARMS}
CONTRASTS = (  # (arm, reference): reported as arm - reference when both ran
    ("own_step", "plain_fkl"),
    ("own_step", "own_step_shuffled"),
    ("own_step", "calibrated"),
    ("calibrated", "plain_fkl"),
    ("onpolicy_jsd_own", "onpolicy_jsd"),
    ("onpolicy_jsd_own", "onpolicy_jsd_shuffled"),
    ("onpolicy_jsd", "plain_fkl"),
    ("filtered_sft", "onpolicy_jsd"),
    ("filtered_sft", "onpolicy_jsd_own"),
    ("own_step_mc", "plain_fkl"),
    ("own_step_mc", "answer_sft"),
    ("onpolicy_jsd_own_mc", "onpolicy_jsd"),
    ("onpolicy_jsd_own_mc", "answer_sft"),
    ("answer_sft", "onpolicy_jsd"),
)


def distill(cfg: CalibratedKDConfig | str, teacher: TinyLM, init: TinyLM, seed: int, args):
    """One arm of one seed; the seeded streams make arms of a seed share their draws."""
    student = copy.deepcopy(init)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
    probs_rng, prefix_rng = random.Random(seed), random.Random(10_000 + seed)
    gen = torch.Generator().manual_seed(seed)
    pgen = torch.Generator().manual_seed(20_000 + seed)
    for _ in range(args.b_steps):
        probs = [TASK.sample(probs_rng) for _ in range(args.bs)]
        if isinstance(cfg, str):
            keep = filter_valid_traces if cfg == "steps" else filter_answer_traces
            traces = keep(sample_traces(teacher, probs, gen), [sum(p) for p in probs])
            if traces:
                student.train()
                sft_step(student, opt, traces)
            continue
        batch = build_calibrated_batch(teacher, student, probs, cfg, TASK, prefix_rng, gen, pgen)
        student.train()
        with torch.no_grad():
            t_logits, _ = teacher(batch.ids)
        s_logits, _ = student(batch.ids)
        loss = calibrated_kd_loss(s_logits, t_logits, batch.target_mask, batch.token_weights, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


def evaluate(model: TinyLM, problems) -> dict[str, float]:
    """Greedy answer accuracy and step validity, from one set of greedy traces, and a digest
    of the weights (sum of |w| in float64) that tells bit-for-bit reruns apart."""
    traces = sample_traces(model, problems, greedy=True)
    ok = [T.trace_valid(t) for t in traces]
    return {
        "digest": float(sum(p.detach().double().abs().sum() for p in model.parameters())),
        "acc": float(np.mean([T.final_answer(t) == sum(p) for t, p in zip(traces, problems)])),
        "valid": sum(a for a, _ in ok) / max(1, sum(b for _, b in ok)),
    }


def run(args) -> dict:
    """Every figure of the run: the teacher's, then per seed the warm start's and each arm's."""
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rng = random.Random(12345)
    test = [TASK.sample(rng) for _ in range(args.n_test)]
    teacher = freeze(
        train_sft(
            make_lm(64, 11),
            args.teacher_steps,
            seed=11,
            carry_error=args.teacher_error,
            error_min_units=args.error_min_units,
        )
    )
    out: dict = {
        "teacher": evaluate(teacher, test),
        "seeds": [],
    }
    print(f"[teacher] {out['teacher']} ({time.time() - t0:.0f}s)", flush=True)
    for seed in range(args.seed0, args.seed0 + args.seeds):
        init = train_sft(make_lm(32, 2000 + seed), args.warm_steps, 700 + seed, bs=32)
        row = {"seed": seed, "init": evaluate(init, test), "arms": {}}
        for arm in args.arms:
            cfg = ALL_ARMS[arm]
            if isinstance(cfg, CalibratedKDConfig) and cfg.validity == "rollout":
                cfg = dataclasses.replace(cfg, n_rollouts=args.mc)
            row["arms"][arm] = evaluate(distill(cfg, teacher, init, seed, args), test)
        out["seeds"].append(row)
        if args.json:  # after every seed, so a stopped run keeps its finished seeds
            args.json.write_text(json.dumps(out, indent=1))
        print(
            f"[seed {seed}] init={row['init']['acc']:.4f} "
            + " ".join(f"{a}={v['acc']:.4f}/{v['valid']:.4f}" for a, v in row["arms"].items())
            + f" ({time.time() - t0:.0f}s)",
            flush=True,
        )
    return out


def merge(outs: list[dict]) -> dict:
    """One run from several runs of other arms or other seeds: per seed, the union of the arms
    of the runs that have it, over the seeds that end up with every arm (a stopped run keeps
    its finished seeds; a run of seeds 4-9 completes one of seeds 0-3).

    The runs must share the teacher and, seed by seed, the warm start (same digests), which
    holds for runs of the same settings, since an arm's figures do not depend on the arms
    run beside it. An arm found in two runs must have identical figures there.
    """
    base = {**copy.deepcopy(outs[0]), "seeds": []}
    rows: dict[int, dict] = {}
    for other in outs:
        if other["teacher"] != base["teacher"]:
            raise ValueError("runs with different teachers cannot be merged")
        for extra in other["seeds"]:
            row = rows.setdefault(extra["seed"], {**copy.deepcopy(extra), "arms": {}})
            if extra["init"] != row["init"]:
                raise ValueError(f"seed {row['seed']}: the warm starts differ")
            for arm, fig in extra["arms"].items():
                if row["arms"].setdefault(arm, fig) != fig:
                    raise ValueError(f"seed {row['seed']}: arm {arm} differs between runs")
    arms = set().union(*(r["arms"] for r in rows.values()))
    base["seeds"] = [rows[k] for k in sorted(rows) if set(rows[k]["arms"]) == arms]
    if not base["seeds"]:
        raise ValueError("no seed has every arm of the runs")
    return base


def summary(out: dict) -> dict:
    """Per-arm means and paired differences (95 % Student-t intervals over seeds)."""
    arms = list(out["seeds"][0]["arms"]) if out["seeds"] else []

    def col(arm: str, key: str) -> np.ndarray:
        return np.array([r["arms"][arm][key] for r in out["seeds"]])

    init = np.array([r["init"]["acc"] for r in out["seeds"]])
    res = {"arms": {}, "contrasts": {}, "init": t_interval(init)}
    for a in arms:
        res["arms"][a] = {k: t_interval(col(a, k)) for k in ("acc", "valid")}
        res["arms"][a]["acc_vs_init"] = t_interval(col(a, "acc") - init)
    for a, ref in CONTRASTS:
        if a in arms and ref in arms:
            res["contrasts"][f"{a} - {ref}"] = {
                k: t_interval(col(a, k) - col(ref, k)) for k in ("acc", "valid")
            }
    return res


def report(out: dict, args) -> str:
    """Markdown tables for benchmarks/README.md."""
    res = summary(out)

    def f(m: float, lo: float, hi: float, sign: str = "") -> str:
        return f"{m:{sign}.4f} [{lo:{sign}.4f}, {hi:{sign}.4f}]"

    n = len(out["seeds"])
    lines = [
        f"teacher: answer acc {out['teacher']['acc']:.4f}, step validity "
        f"{out['teacher']['valid']:.4f}; warm start acc {f(*res['init'])} ({n} seeds: "
        + " ".join(str(r["seed"]) for r in out["seeds"])
        + ")",
        "",
        "| arm | answer acc [95% CI] | step validity [95% CI] | acc - warm start [95% CI] |",
        "|---|---|---|---|",
    ]
    for a, r in res["arms"].items():
        lines.append(f"| {a} | {f(*r['acc'])} | {f(*r['valid'])} | {f(*r['acc_vs_init'], '+')} |")
    lines += [
        "",
        f"| paired difference ({n} seeds) | answer acc [95% CI] | step validity [95% CI] |",
    ]
    lines.append("|---|---|---|")
    for name, r in res["contrasts"].items():
        lines.append(f"| {name} | {f(*r['acc'], '+')} | {f(*r['valid'], '+')} |")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--seed0", type=int, default=0, help="first seed (figures are per seed)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ALL_ARMS))
    ap.add_argument("--mc", type=int, default=2, help="rollouts per proposal (the _mc arms)")
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--warm-steps", type=int, default=400)
    ap.add_argument("--b-steps", type=int, default=200)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--teacher-error", type=float, default=0.9)
    ap.add_argument("--error-min-units", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write every figure here (after each seed)")
    ap.add_argument(
        "--report",
        type=Path,
        nargs="+",
        help="print the tables of --json files and exit (several: arms merged per common seed)",
    )
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.report:
        out = merge([json.loads(p.read_text()) for p in args.report])
    else:
        out = run(args)
    print("\n" + report(out, args))
    return out


if __name__ == "__main__":
    main()
