"""Synthetic reasoning task generated in code: multi-operand addition as step-by-step rewrites.

A trace reads ``3+5+2+7=8+2+7;8+9;17<eos>``: each step merges one adjacent pair of terms into
its sum, so a problem with n operands has (n-1)! valid step orders but one answer, and every
step can be checked exactly. ``carry_error`` corrupts traces the way a weak teacher would:
a merge whose units digits carry is written without the carry (8+5 -> 3).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

PAD, BOS, EOS, PLUS, EQ, SEP = 0, 1, 2, 3, 4, 5
DIGIT0 = 6
VOCAB_SIZE = 16
_CHARS = {PAD: "_", BOS: "^", EOS: "$", PLUS: "+", EQ: "=", SEP: ";"}


@dataclass
class AdditionTask:
    """Problem distribution: ``n_operands`` integers drawn uniformly from [1, max_operand]."""

    n_operands: int = 4
    max_operand: int = 9
    max_step_tokens: int = 8  # longest step a proposal may take before it is cut (and invalid)

    def sample(self, rng: random.Random) -> list[int]:
        return [rng.randint(1, self.max_operand) for _ in range(self.n_operands)]


def number_tokens(x: int) -> list[int]:
    return [DIGIT0 + int(c) for c in str(x)]


def terms_tokens(terms: Sequence[int]) -> list[int]:
    out: list[int] = []
    for i, t in enumerate(terms):
        if i:
            out.append(PLUS)
        out.extend(number_tokens(t))
    return out


def decode(ids: Sequence[int]) -> str:
    return "".join(_CHARS.get(int(t), str(int(t) - DIGIT0)) for t in ids)


def prompt(operands: Sequence[int]) -> list[int]:
    """``^a+b+c+d=``: the part every trace shares."""
    return [BOS] + terms_tokens(operands) + [EQ]


def sample_states(
    operands: Sequence[int],
    rng: random.Random,
    carry_error: float = 0.0,
    error_min_units: int = 10,
) -> list[list[int]]:
    """Random order of adjacent merges; returns the states after each step (last has 1 term).

    With probability ``carry_error``, a merge whose units digits sum to ``error_min_units`` or
    more (>= 10: it carries) drops the carry, a systematic error for imperfect teachers.
    """
    state, states = list(operands), []
    while len(state) > 1:
        i = rng.randrange(len(state) - 1)
        a, b = state[i], state[i + 1]
        s = a + b
        units = (a % 10) + (b % 10)
        if carry_error and units >= max(10, error_min_units) and rng.random() < carry_error:
            s -= 10
        state = state[:i] + [s] + state[i + 2 :]
        states.append(state)
    return states


def format_trace(operands: Sequence[int], states: Sequence[Sequence[int]]) -> list[int]:
    ids = prompt(operands)
    for k, st in enumerate(states):
        ids.extend(terms_tokens(st))
        ids.append(EOS if k == len(states) - 1 else SEP)
    return ids


def parse_terms(tokens: Sequence[int]) -> list[int] | None:
    """Terms of ``d+dd+d`` (no separator); None if malformed."""
    terms, cur = [], ""
    for t in tokens:
        t = int(t)
        if DIGIT0 <= t < DIGIT0 + 10:
            cur += str(t - DIGIT0)
        elif t == PLUS and cur:
            terms.append(int(cur))
            cur = ""
        else:
            return None
    if not cur or (len(cur) > 1 and cur[0] == "0"):
        return None
    terms.append(int(cur))
    return terms


def state_before(prefix: Sequence[int]) -> list[int] | None:
    """The expression a prefix ends on: the prompt's terms or the last completed step's."""
    p = [int(t) for t in prefix]
    if EQ not in p:
        return None
    eq = p.index(EQ)
    if len(p) == eq + 1:
        return parse_terms(p[1:eq])
    if p[-1] != SEP:
        return None
    body = p[eq + 1 : -1]
    last = body[len(body) - body[::-1].index(SEP) :] if SEP in body else body
    return parse_terms(last)


def check_step(state: Sequence[int] | None, step: Sequence[int]) -> bool:
    """Exact local validity: ``step`` merges one adjacent pair of ``state`` correctly and ends
    with ``;`` (terms remain) or ``<eos>`` (a single number remains)."""
    if state is None or not step or int(step[-1]) not in (SEP, EOS):
        return False
    new = parse_terms(step[:-1])
    if new is None or len(new) != len(state) - 1:
        return False
    if (int(step[-1]) == EOS) != (len(new) == 1):
        return False
    for i in range(len(state) - 1):
        if state[:i] + [state[i] + state[i + 1]] + state[i + 2 :] == list(new):
            return True
    return False


def step_spans(ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) token spans of each step after ``=`` (end exclusive, separator included).

    An unfinished last step (no ``;``/``<eos>``) is returned too, so every response token
    belongs to exactly one step.
    """
    p = [int(t) for t in ids]
    if EQ not in p:
        return []
    spans, start = [], p.index(EQ) + 1
    for i in range(start, len(p)):
        if p[i] == PAD:
            break
        if p[i] in (SEP, EOS):
            spans.append((start, i + 1))
            start = i + 1
            if p[i] == EOS:
                return spans
    if start < len(p) and p[start] != PAD:
        end = p.index(PAD, start) if PAD in p[start:] else len(p)
        spans.append((start, end))
    return spans


def final_answer(ids: Sequence[int]) -> int | None:
    """The single number before ``<eos>``, or None if the trace never finishes."""
    p = [int(t) for t in ids]
    if EOS not in p:
        return None
    end = p.index(EOS)
    start = max((i for i in range(end) if p[i] in (SEP, EQ)), default=-1) + 1
    terms = parse_terms(p[start:end])
    return terms[0] if terms is not None and len(terms) == 1 else None


def trace_valid(ids: Sequence[int]) -> tuple[int, int]:
    """(valid steps, total steps) of a full trace, each step checked against its own prefix."""
    p = [int(t) for t in ids]
    spans = step_spans(p)
    ok = sum(check_step(state_before(p[:s]), p[s:e]) for s, e in spans)
    return ok, len(spans)
