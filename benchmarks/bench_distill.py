"""Distillation companions on the synthetic addition-by-rewrites task, paired seeds, CPU-sized.

Part A (Flex-KD, issue 7): a d=64 teacher trained on gold traces; students of widths 16 and 32
learn from a small pool of traces with L_task + alpha*KD + beta*L_feat. Arms: logit KD only,
Flex-KD (gradient-selected dims), random-dims control, learned linear projector. Issue 18's
runs live in bench_flexkd.py (Flex-KD) and bench_reasoning_kd.py (validity-calibrated
reasoning KD, which replaced this script's part B and reuses its helpers below).

Every arm of a seed starts from the same student and sees the same number of optimizer steps
and batch size. Reports greedy answer accuracy on held-out problems, means over seeds and
bootstrap 95% intervals of paired differences. Run: python benchmarks/bench_distill.py.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from ecif.companions import tasks as T
from ecif.companions.flexkd import (
    FlexKDConfig,
    LinearProjector,
    flexkd_loss,
    select_random_dims,
    select_top_dims,
    task_ce,
    teacher_dimension_scores,
    teacher_directions,
)
from ecif.companions.reasoning_kd import response_mask, sample_traces
from ecif.companions.toy_lm import LMConfig, TinyLM, freeze, pad_batch

TASK = T.AdditionTask(n_operands=4)


def make_lm(d: int, seed: int) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(LMConfig(T.VOCAB_SIZE, d_model=d, n_layers=2, n_heads=4 if d >= 32 else 2))


def gold_traces(problems, rng, carry_error=0.0, error_min_units=10):
    return [
        T.format_trace(p, T.sample_states(p, rng, carry_error, error_min_units)) for p in problems
    ]


def lm_batch(traces):
    ids, _ = pad_batch(traces, T.PAD)
    return ids, response_mask(traces, ids.shape[1])


def sft_step(model, opt, traces):
    ids, mask = lm_batch(traces)
    logits, _ = model(ids)
    loss = task_ce(logits[:, :-1], ids[:, 1:], mask[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_sft(model, steps, seed, bs=64, lr=3e-3, carry_error=0.0, error_min_units=10, pool=None):
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    for _ in range(steps):
        if pool is None:
            probs = [TASK.sample(rng) for _ in range(bs)]
            sft_step(model, opt, gold_traces(probs, rng, carry_error, error_min_units))
        else:
            sft_step(model, opt, rng.sample(pool, bs))
    return model


def accuracy(model, problems) -> float:
    traces = sample_traces(model, problems, greedy=True)
    return float(np.mean([T.final_answer(t) == sum(p) for t, p in zip(traces, problems)]))


@torch.no_grad()
def heldout_ce(model, traces) -> float:
    """Teacher-forced cross-entropy of the response tokens of held-out gold traces."""
    ids, mask = lm_batch(traces)
    logits, _ = model(ids)
    return float(task_ce(logits[:, :-1], ids[:, 1:], mask[:, 1:]))


def paired_ci(diff, n_boot=10000, seed=0):
    rng = np.random.default_rng(seed)
    d = np.asarray(diff, dtype=float)
    boots = rng.choice(d, size=(n_boot, d.size), replace=True).mean(1)
    return float(d.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


# ----------------------------------------------------------------------------- Part A


def flexkd_run(arm, teacher, width, seed, pool, steps, bs, test, test_traces, scores, dirs):
    student = make_lm(width, 1000 + seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = FlexKDConfig(alpha=1.0, beta=1.0)
    selection, projector = None, None
    if arm == "flex":
        selection = select_top_dims(scores, width)
    elif arm == "random":
        selection = select_random_dims(teacher.cfg.d_model, width, gen)
    elif arm == "directions":
        selection = dirs[width]
    elif arm == "projector":
        projector = LinearProjector(width, teacher.cfg.d_model)
    params = list(student.parameters()) + (list(projector.parameters()) if projector else [])
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    rng = random.Random(seed)
    for _ in range(steps):
        ids, mask = lm_batch(rng.sample(pool, bs))
        with torch.no_grad():
            t_logits, t_hidden = teacher(ids)
        s_logits, s_hidden = student(ids)
        loss, _ = flexkd_loss(
            s_logits[:, :-1],
            s_hidden[:, :-1],
            t_logits[:, :-1],
            t_hidden[:, :-1],
            ids[:, 1:],
            mask[:, 1:],
            cfg,
            selection=selection,
            projector=projector,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return accuracy(student, test), heldout_ce(student, test_traces)


def part_a(args, test):
    t0 = time.time()
    teacher = freeze(train_sft(make_lm(64, 7), args.teacher_steps, seed=7))
    print(f"[A] teacher acc {accuracy(teacher, test):.3f} ({time.time() - t0:.0f}s)", flush=True)
    rng = random.Random(99)
    score_pool = gold_traces([TASK.sample(rng) for _ in range(512)], rng)

    def task_loss(traces):
        ids, mask = lm_batch(traces)
        logits, _ = teacher(ids)
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, T.VOCAB_SIZE), ids[:, 1:].reshape(-1), reduction="none"
        )
        m = torch.nn.functional.pad(mask[:, 1:], (0, 1))  # hidden at p predicts token p + 1
        return (ce * mask[:, 1:].reshape(-1)).sum(), m

    batches = [score_pool[i : i + 128] for i in range(0, 512, 128)]
    scores = teacher_dimension_scores(teacher.final_norm, batches, task_loss, "abs")
    dirs = {w: teacher_directions(teacher.final_norm, batches, task_loss, w) for w in args.widths}
    share = {
        w: float(scores.sort(descending=True).values[:w].sum() / scores.sum()) for w in args.widths
    }
    print(
        "[A] score mass in the top-d_S teacher dims (uniform would be d_S/64): "
        + " ".join(f"{w}: {share[w]:.3f}" for w in args.widths),
        flush=True,
    )
    arms = ["kd_only", "flex", "random", "projector"] + (["directions"] if args.directions else [])
    res = {w: {a: [] for a in arms} for w in args.widths}
    res_ce = {w: {a: [] for a in arms} for w in args.widths}
    trng = random.Random(4242)
    test_traces = gold_traces(test, trng)
    for seed in range(args.seeds):
        prng = random.Random(500 + seed)
        pool = gold_traces([TASK.sample(prng) for _ in range(args.pool)], prng)
        for w in args.widths:
            for arm in arms:
                acc, ce = flexkd_run(
                    arm, teacher, w, seed, pool, args.a_steps, 32, test, test_traces, scores, dirs
                )
                res[w][arm].append(acc)
                res_ce[w][arm].append(ce)
            print(
                f"[A] seed {seed} width {w}: "
                + " ".join(f"{a}={res[w][a][-1]:.3f}/{res_ce[w][a][-1]:.3f}" for a in arms)
                + f" ({time.time() - t0:.0f}s)",
                flush=True,
            )
    return res, res_ce


def table(res, ref, label, metric="answer acc"):
    rows = [f"| {label} | {metric} | diff vs {ref} [95% CI] |", "|---|---|---|"]
    for arm, vals in res.items():
        mean = np.mean(vals)
        if arm == ref:
            rows.append(f"| {arm} | {mean:.3f} | (reference) |")
        else:
            d, lo, hi = paired_ci(np.array(vals) - np.array(res[ref]))
            rows.append(f"| {arm} | {mean:.3f} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--pool", type=int, default=256, help="training traces per seed")
    ap.add_argument("--a-steps", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--directions", action="store_true", help="add the eigen-directions arm")
    ap.add_argument("--parts", default="A", help="A (part B moved to bench_reasoning_kd.py)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(12345)
    test = [TASK.sample(rng) for _ in range(args.n_test)]
    t0 = time.time()
    if "A" in args.parts:
        res, res_ce = part_a(args, test)
        for w in args.widths:
            print(f"\nFlex-KD, student width {w} (teacher 64), {args.seeds} paired seeds")
            print(table(res[w], "flex", f"arm (d_S={w})"))
            print(table(res_ce[w], "flex", f"arm (d_S={w})", "held-out CE"))
    print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
