"""Validity-calibrated reasoning distillation (Saadi & Wang, 2026), reconstructed.

Reasoning steps are locally under-specified: several next steps can be right, and a teacher
can be wrong. At every step boundary of a trace, teacher and student each propose the next
step under the same prefix; a validity function V(prefix, step) in [0, 1] scores both, and
the distillation loss on that step's tokens is weighted by w = (1 + V_T - V_S) / 2
(detached). Teacher valid / student invalid pulls fully (w = 1); equal validity pulls half;
a teacher error the student avoids is not imitated (w = 0). w = 1 is plain KD.

Prefixes are GKD-style: a trace is sampled from the student with probability
``student_prefix_frac``, else from the teacher. With ``proposals='sampled'`` both proposals
are drawn afresh at each boundary and the weight lands on the trace's own step, which neither
proposal is; with ``proposals='own'`` the trace's own step is its author's proposal (the
teacher's for a teacher trace, the student's for a student trace) and only the other model's
proposal is sampled, so the weight is computed from the step actually distilled. The synthetic task lives in
:mod:`ecif.companions.tasks`; the divergences in :mod:`ecif.grad.divergences`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ecif.companions import tasks as T
from ecif.companions.toy_lm import TinyLM, generate, pad_batch
from ecif.grad import masked_divergence

WEIGHTINGS = ("linear", "sigmoid", "none", "shuffled")


@dataclass
class CalibratedKDConfig:
    """Choices of the method; ``weighting='none'`` gives the plain-KD baselines."""

    divergence: str = "fkl"  # fkl | rkl | jsd
    jsd_beta: float = 0.5
    temperature: float = 1.0
    weighting: str = "linear"  # linear | sigmoid | none | shuffled (control)
    sigmoid_scale: float = 4.0  # w = sigmoid(scale * (V_T - V_S)) for the sigmoid variant
    floor: float = 0.0  # lower bound on w
    student_prefix_frac: float = 0.5  # share of traces sampled from the student
    validity: str = "checker"  # checker | rollout
    n_rollouts: int = 4  # Monte-Carlo rollouts per proposal (validity='rollout')
    sample_temperature: float = 1.0
    normalize: str = "tokens"  # tokens: w scales the pull; weights: only relative reweighting
    proposals: str = "sampled"  # sampled: both proposals drawn; own: the trace's step is one


def validity_weights(
    v_teacher: torch.Tensor,
    v_student: torch.Tensor,
    mode: str = "linear",
    *,
    floor: float = 0.0,
    sigmoid_scale: float = 4.0,
) -> torch.Tensor:
    """Per-step weights from the two validities (detached; ``none`` returns ones).

    ``linear``: (1 + V_T - V_S) / 2. ``sigmoid``: sigmoid(scale * (V_T - V_S)), also 1/2 at
    equal validity but saturating. The floor keeps a minimum pull on every step.
    """
    vt, vs = v_teacher.detach().float(), v_student.detach().float()
    if mode == "none":
        return torch.ones_like(vt)
    if mode in ("linear", "shuffled"):
        w = (1.0 + vt - vs) / 2.0
    elif mode == "sigmoid":
        w = torch.sigmoid(sigmoid_scale * (vt - vs))
    else:
        raise ValueError(f"unknown weighting {mode!r}; expected one of {WEIGHTINGS}")
    return w.clamp(min=floor, max=1.0)


def step_token_weights(
    spans: Sequence[Sequence[tuple[int, int]]], step_weights: Sequence[Sequence[float]], length: int
) -> torch.Tensor:
    """(B, length) tensor: every token of step k in row b gets ``step_weights[b][k]``."""
    out = torch.zeros(len(spans), length)
    for b, (row_spans, row_w) in enumerate(zip(spans, step_weights)):
        for (s, e), w in zip(row_spans, row_w):
            out[b, s:e] = w
    return out


def calibrated_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_mask: torch.Tensor,
    token_weights: torch.Tensor,
    cfg: CalibratedKDConfig,
) -> torch.Tensor:
    """Weighted per-token divergence. ``target_mask``/``token_weights`` index the *predicted*
    tokens (position p is predicted by the logits at p - 1), as built by
    :func:`build_calibrated_batch`; the shift happens here. ``normalize='tokens'`` divides by
    the number of distilled tokens (w < 1 weakens the update); ``'weights'`` divides by the
    sum of weights (same mean step size as plain KD). Both equal plain KD when w = 1.
    """
    loss = masked_divergence(
        student_logits[:, :-1],
        teacher_logits[:, :-1].detach(),
        target_mask[:, 1:],
        cfg.divergence,
        weights=token_weights[:, 1:].detach(),
        beta=cfg.jsd_beta,
        temperature=cfg.temperature,
    )
    if cfg.normalize == "weights":
        m = target_mask[:, 1:]
        loss = loss * (m.sum() / (token_weights[:, 1:].detach() * m).sum().clamp_min(1e-8))
    elif cfg.normalize != "tokens":
        raise ValueError(f"unknown normalize {cfg.normalize!r}")
    return loss


def checker_validity(
    prefixes: Sequence[Sequence[int]], steps: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Exact local validity (0/1) of each step given its prefix."""
    return torch.tensor(
        [float(T.check_step(T.state_before(p), s)) for p, s in zip(prefixes, steps)]
    )


def rollout_validity(
    policy: TinyLM,
    prefixes: Sequence[Sequence[int]],
    steps: Sequence[Sequence[int]],
    golds: Sequence[int],
    n_rollouts: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Monte-Carlo validity: share of ``policy`` rollouts from prefix + step whose final answer
    is the gold one. Needs no checker, only the answer; a step cut before its separator is 0.
    """
    n = len(prefixes)
    v = torch.zeros(n)
    starts, owners = [], []
    for i, (p, s) in enumerate(zip(prefixes, steps)):
        seq = list(p) + list(s)
        if not s or s[-1] not in (T.SEP, T.EOS):
            continue
        if s[-1] == T.EOS:
            v[i] = float(T.final_answer(seq) == golds[i])
            continue
        for _ in range(n_rollouts):
            starts.append(seq)
            owners.append(i)
    if starts:
        room = policy.cfg.max_len - min(len(s) for s in starts)
        cont = generate(policy, starts, room, [T.EOS], temperature=temperature, generator=generator)
        hits = torch.zeros(n)
        for i, seq, c in zip(owners, starts, cont):
            hits[i] += float(T.final_answer(seq + c) == golds[i])
        for i in set(owners):
            v[i] = hits[i] / n_rollouts
    return v


def propose_steps(
    model: TinyLM,
    prefixes: Sequence[Sequence[int]],
    task: T.AdditionTask,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> list[list[int]]:
    """One sampled next step per prefix (stops at ``;`` or ``<eos>``)."""
    return generate(
        model,
        prefixes,
        task.max_step_tokens,
        [T.SEP, T.EOS],
        temperature=temperature,
        generator=generator,
    )


def sample_traces(
    model: TinyLM,
    problems: Sequence[Sequence[int]],
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    greedy: bool = False,
) -> list[list[int]]:
    """Full traces (prompt included) sampled from ``model``."""
    prompts = [T.prompt(p) for p in problems]
    room = model.cfg.max_len - min(len(p) for p in prompts)
    cont = generate(
        model, prompts, room, [T.EOS], temperature=temperature, greedy=greedy, generator=generator
    )
    return [p + c for p, c in zip(prompts, cont)]


def author_validities(
    v_own: torch.Tensor, v_other: torch.Tensor, by_student: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V_T, V_S) when the trace's own step is its author's proposal: ``v_own`` scores the
    step in the trace, ``v_other`` the other model's proposal under the same prefix, and
    ``by_student[i]`` says the student wrote step i's trace."""
    who = torch.tensor([bool(b) for b in by_student], dtype=torch.bool)
    v_own, v_other = v_own.float(), v_other.float()
    return torch.where(who, v_other, v_own), torch.where(who, v_own, v_other)


@dataclass
class CalibratedBatch:
    """A training batch: token ids, which tokens are distilled, and their weights."""

    ids: torch.Tensor
    target_mask: torch.Tensor
    token_weights: torch.Tensor
    v_teacher: torch.Tensor  # per step, flattened over the batch (empty for 'none')
    v_student: torch.Tensor


def build_calibrated_batch(
    teacher: TinyLM,
    student: TinyLM,
    problems: Sequence[Sequence[int]],
    cfg: CalibratedKDConfig,
    task: T.AdditionTask,
    rng: random.Random,
    generator: torch.Generator | None = None,
    proposal_generator: torch.Generator | None = None,
) -> CalibratedBatch:
    """Sample traces (student or teacher), propose steps at each boundary, score, weight.

    ``proposal_generator`` (default: ``generator``) draws the proposals, rollouts and the
    shuffle, so arms that differ only in weighting can share their trace draws.
    """
    pgen = generator if proposal_generator is None else proposal_generator
    from_student = [rng.random() < cfg.student_prefix_frac for _ in problems]
    traces: list[list[int]] = [[] for _ in problems]
    for who, model in ((True, student), (False, teacher)):
        idx = [i for i, s in enumerate(from_student) if s == who]
        if idx:
            got = sample_traces(
                model, [problems[i] for i in idx], generator, cfg.sample_temperature
            )
            for i, tr in zip(idx, got):
                traces[i] = tr
    spans = [T.step_spans(tr) for tr in traces]
    owners = [(b, k) for b, sp in enumerate(spans) for k in range(len(sp))]
    prefixes = [traces[b][: spans[b][k][0]] for b, k in owners]
    if cfg.weighting == "none" or not owners:
        vt = vs = torch.ones(0)
        flat_w = torch.ones(len(owners))
    else:
        if cfg.validity == "checker":

            def score(props: list[list[int]]) -> torch.Tensor:
                return checker_validity(prefixes, props)

        elif cfg.validity == "rollout":
            golds = [sum(problems[b]) for b, _ in owners]

            def score(props: list[list[int]]) -> torch.Tensor:
                return rollout_validity(teacher, prefixes, props, golds, cfg.n_rollouts, pgen)

        else:
            raise ValueError(f"unknown validity estimator {cfg.validity!r}")
        if cfg.proposals == "sampled":
            vt = score(propose_steps(teacher, prefixes, task, pgen, cfg.sample_temperature))
            vs = score(propose_steps(student, prefixes, task, pgen, cfg.sample_temperature))
        elif cfg.proposals == "own":
            by_student = [from_student[b] for b, _ in owners]
            other: list[list[int]] = [[] for _ in owners]
            for model, who in ((student, False), (teacher, True)):  # the non-author proposes
                idx = [i for i, s in enumerate(by_student) if s == who]
                if not idx:
                    continue
                got = propose_steps(
                    model, [prefixes[i] for i in idx], task, pgen, cfg.sample_temperature
                )
                for i, st in zip(idx, got):
                    other[i] = st
            own = [traces[b][spans[b][k][0] : spans[b][k][1]] for b, k in owners]
            vt, vs = author_validities(score(own), score(other), by_student)
        else:
            raise ValueError(f"unknown proposals {cfg.proposals!r}; expected sampled | own")
        flat_w = validity_weights(
            vt, vs, cfg.weighting, floor=cfg.floor, sigmoid_scale=cfg.sigmoid_scale
        )
        if cfg.weighting == "shuffled":
            perm = torch.randperm(len(flat_w), generator=pgen)
            flat_w = flat_w[perm]
    per_row: list[list[float]] = [[] for _ in traces]
    for (b, _k), w in zip(owners, flat_w.tolist()):
        per_row[b].append(w)
    ids, _ = pad_batch(traces, T.PAD)
    mask = torch.zeros_like(ids, dtype=torch.float)
    for b, sp in enumerate(spans):
        if sp:
            mask[b, sp[0][0] : sp[-1][1]] = 1.0
    return CalibratedBatch(ids, mask, step_token_weights(spans, per_row, ids.shape[1]), vt, vs)


def response_mask(traces: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """(B, length) mask of the tokens after ``=`` (predicted-token convention)."""
    mask = torch.zeros(len(traces), length)
    for b, tr in enumerate(traces):
        sp = T.step_spans(tr)
        if sp:
            mask[b, sp[0][0] : sp[-1][1]] = 1.0
    return mask


def filter_valid_traces(traces: Sequence[Sequence[int]], golds: Sequence[int]) -> list[list[int]]:
    """Checker-filtered SFT data: keep traces whose every step is valid and answer correct."""
    keep = []
    for tr, g in zip(traces, golds):
        ok, n = T.trace_valid(tr)
        if n and ok == n and T.final_answer(tr) == g:
            keep.append(list(tr))
    return keep


def filter_answer_traces(traces: Sequence[Sequence[int]], golds: Sequence[int]) -> list[list[int]]:
    """Answer-only filtered SFT data, for settings without a per-step checker: keep traces
    whose final answer is the gold one, whatever their steps."""
    return [list(tr) for tr, g in zip(traces, golds) if T.final_answer(tr) == g]
