"""Two unrelated tasks behind a task token, for a teacher whose hidden state carries variance
that the target task does not use.

Flex-KD's premise is that a teacher's hidden state holds more than the student's task needs,
and that gradient scores on the target task find the part that matters. A teacher trained on
one task only uses all its dimensions for it; one trained on two tasks must also represent the
other. The target task is addition by rewrites (:mod:`ecif.companions.tasks`); the second
task reverses a string of digits. A token after ``^`` says which task a sequence belongs to::

    ^<add>3+5+2+7=8+2+7;8+9;17$      ^<rev>31415926=62951413$

Both tasks put their response after ``=`` and end it with ``<eos>``, so the response masks of
:mod:`ecif.companions.reasoning_kd` and :func:`ecif.companions.tasks.final_answer` apply
unchanged to tagged sequences.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ecif.companions import tasks as T

ADD = T.VOCAB_SIZE  # task token of the target task (addition by rewrites)
REV = T.VOCAB_SIZE + 1  # task token of the second task (digit reversal)
VOCAB_SIZE = T.VOCAB_SIZE + 2
_TAGS = {ADD: "<add>", REV: "<rev>"}


@dataclass
class ReverseTask:
    """The second task: a string of ``length`` digits (0-9) to be written back reversed."""

    length: int = 8

    def sample(self, rng: random.Random) -> list[int]:
        return [rng.randint(0, 9) for _ in range(self.length)]


def tag(ids: Sequence[int], task_token: int) -> list[int]:
    """``ids`` (starting with ``^``) with the task token inserted right after ``^``."""
    ids = [int(t) for t in ids]
    if not ids or ids[0] != T.BOS:
        raise ValueError("a sequence must start with BOS to be tagged")
    if task_token not in _TAGS:
        raise ValueError(f"unknown task token {task_token}")
    return [T.BOS, task_token] + ids[1:]


def add_prompt(operands: Sequence[int]) -> list[int]:
    """``^<add>a+b+c+d=``: what the model continues to solve an addition problem."""
    return tag(T.prompt(operands), ADD)


def add_trace(operands: Sequence[int], rng: random.Random) -> list[int]:
    """A gold addition trace (random merge order drawn from ``rng``), tagged."""
    return tag(T.format_trace(operands, T.sample_states(operands, rng)), ADD)


def reverse_prompt(digits: Sequence[int]) -> list[int]:
    """``^<rev>d1...dn=``."""
    return [T.BOS, REV] + [T.DIGIT0 + int(d) for d in digits] + [T.EQ]


def reverse_trace(digits: Sequence[int]) -> list[int]:
    """``^<rev>d1...dn=dn...d1$``."""
    return reverse_prompt(digits) + [T.DIGIT0 + int(d) for d in reversed(digits)] + [T.EOS]


def reverse_answer(ids: Sequence[int]) -> list[int] | None:
    """The digits between ``=`` and ``<eos>``; None if the sequence never finishes or holds
    anything else there."""
    p = [int(t) for t in ids]
    if T.EQ not in p or T.EOS not in p[p.index(T.EQ) :]:
        return None
    eq = p.index(T.EQ)
    body = p[eq + 1 : p.index(T.EOS, eq)]
    if any(not T.DIGIT0 <= t < T.DIGIT0 + 10 for t in body):
        return None
    return [t - T.DIGIT0 for t in body]


def mixed_traces(
    n: int,
    rng: random.Random,
    other_frac: float,
    add_task: T.AdditionTask,
    rev_task: ReverseTask,
) -> list[list[int]]:
    """``n`` gold traces, each a reversal with probability ``other_frac``, else an addition."""
    out = []
    for _ in range(n):
        if rng.random() < other_frac:
            out.append(reverse_trace(rev_task.sample(rng)))
        else:
            out.append(add_trace(add_task.sample(rng), rng))
    return out


def decode(ids: Sequence[int]) -> str:
    """Readable form of a tagged sequence (task tokens as ``<add>`` / ``<rev>``)."""
    return "".join(_TAGS.get(int(t)) or T.decode([t]) for t in ids)
