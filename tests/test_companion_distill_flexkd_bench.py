"""The two-task data behind a task token, and benchmarks/bench_flexkd.py: its scores on the
response tokens, its per-arm beta selection, its summary arithmetic, and that a small run
gives identical figures twice."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecif.companions import task_mix as M
from ecif.companions import tasks as T
from ecif.companions.reasoning_kd import response_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_flexkd as B  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = T.DIGIT0


# ----------------------------------------------------------------- task-token data


def test_reverse_trace_and_its_answer():
    tr = M.reverse_trace([3, 1, 4])
    assert tr == [T.BOS, M.REV, D + 3, D + 1, D + 4, T.EQ, D + 4, D + 1, D + 3, T.EOS]
    assert M.decode(tr) == "^<rev>314=413$"
    assert M.reverse_answer(tr) == [4, 1, 3]
    assert M.reverse_answer(tr[:-1]) is None  # never finished
    assert M.reverse_answer(tr[:6] + [T.PLUS, T.EOS]) is None  # not a digit
    assert M.reverse_prompt([3, 1, 4]) == tr[:6]


def test_tagged_addition_is_the_plain_trace_with_the_token_after_bos():
    rng_a, rng_b = random.Random(5), random.Random(5)
    tagged = M.add_trace([9, 8, 5, 3], rng_a)
    plain = T.format_trace([9, 8, 5, 3], T.sample_states([9, 8, 5, 3], rng_b))
    assert tagged == [plain[0], M.ADD] + plain[1:]
    p = [T.BOS, M.ADD, D + 9, T.PLUS, D + 8, T.PLUS, D + 5, T.PLUS, D + 3, T.EQ]
    assert M.add_prompt([9, 8, 5, 3]) == p == tagged[: len(p)]
    assert T.final_answer(tagged) == 25
    assert M.decode(tagged).startswith("^<add>9+8+5+3=")
    with pytest.raises(ValueError):
        M.tag([T.EQ, D], M.ADD)
    with pytest.raises(ValueError):
        M.tag([T.BOS, D], 3)


def test_response_mask_covers_exactly_the_tokens_after_equals():
    traces = [M.reverse_trace([3, 1, 4]), M.add_trace([1, 2, 3, 4], random.Random(0))]
    mask = response_mask(traces, 30)
    for row, tr in zip(mask, traces):
        eq = tr.index(T.EQ)
        ref = torch.zeros(30)
        ref[eq + 1 : len(tr)] = 1  # the response, <eos> included; nothing of the prompt
        assert torch.equal(row, ref)


def test_mixed_traces_follow_other_frac():
    add, rev = T.AdditionTask(), M.ReverseTask(5)
    only_add = M.mixed_traces(50, random.Random(0), 0.0, add, rev)
    only_rev = M.mixed_traces(50, random.Random(0), 1.0, add, rev)
    assert all(t[1] == M.ADD for t in only_add) and all(t[1] == M.REV for t in only_rev)
    assert all(len(t) == 2 * 5 + 4 for t in only_rev)
    mix = M.mixed_traces(2000, random.Random(1), 0.3, add, rev)
    share = np.mean([t[1] == M.REV for t in mix])
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 2000)  # binomial, 4 sd


# ----------------------------------------------------------------- the benchmark's parts


def test_scores_are_gradients_on_the_response_tokens_only():
    teacher = B.freeze(B.make_lm(8, 0).double())
    traces = [M.add_trace([1, 2, 3, 4], random.Random(i)) for i in range(3)]
    traces.append(M.reverse_trace([5, 6, 7]))
    got = B.score_dims(teacher, traces, bs=2)
    # Independently: hidden state as a leaf, loss by hand on the positions that predict a
    # response token (position p predicts token p + 1).
    total = torch.zeros(8, dtype=torch.float64)
    for tr in traces:
        ids = torch.tensor([tr])
        holder = {}

        def hook(_m, _i, out, holder=holder):
            holder["h"] = out.detach().requires_grad_()
            return holder["h"]

        handle = teacher.final_norm.register_forward_hook(hook)
        logits, _ = teacher(ids)
        handle.remove()
        eq = tr.index(T.EQ)
        loss = F.cross_entropy(logits[0, eq : len(tr) - 1], ids[0, eq + 1 :], reduction="sum")
        (g,) = torch.autograd.grad(loss, holder["h"])
        total += g[0].abs().sum(0)
    assert torch.allclose(got, total, atol=1e-10)


def test_pick_by_validation_takes_the_lowest_and_breaks_ties_toward_the_smaller_beta():
    assert B.pick_by_validation({0.1: 0.52, 0.3: 0.48, 1.0: 0.50, 3.0: 0.61}) == 0.3
    assert B.pick_by_validation({3.0: 0.5, 1.0: 0.7, 0.1: 0.5}) == 0.1
    assert B.pick_by_validation({1.0: 0.4}) == 1.0


def test_summary_intervals_and_verdict_on_hand_made_runs():
    ce = {"flex": [1.0, 1.2, 1.1], "random": [1.1, 1.35, 1.2], "projector": [1.05, 1.25, 1.3],
          "kd_only": [1.0, 1.2, 1.1]}  # fmt: skip
    runs = [
        {"seed": s, "arm": a, "beta": 1.0, "test_ce": ce[a][s], "test_acc": 0.5}
        for s in range(3)
        for a in B.ARMS
    ]
    res = B.summary({"runs": runs})
    m, lo, hi = res["diffs"]["random"]["test_ce"]
    d = np.array([-0.1, -0.15, -0.1])  # flex - random
    half = 4.302653 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert m == pytest.approx(d.mean()) and hi == pytest.approx(d.mean() + half, rel=1e-5)
    assert hi < 0
    # flex - projector: -0.05, -0.05, -0.2: mean -0.1, its interval reaches above 0
    assert res["diffs"]["projector"]["test_ce"][2] > 0
    assert res["premise_holds"] is False
    assert res["arms"]["kd_only"]["test_acc"][0] == pytest.approx(0.5)
    runs_p = [r | {"test_ce": r["test_ce"] + (0.2 if r["arm"] == "projector" else 0)} for r in runs]
    assert B.summary({"runs": runs_p})["premise_holds"] is True


TINY = [
    "--seeds", "2", "--d-teacher", "16", "--d-student", "8", "--teacher-steps", "4",
    "--rev-length", "3", "--betas", "0.1", "1", "--pool", "12", "--steps", "3", "--batch", "4",
    "--score-traces", "8", "--n-val", "6", "--n-test", "6",
]  # fmt: skip


def test_a_tiny_run_gives_identical_figures_twice(tmp_path, capsys):
    first = B.main(TINY + ["--json", str(tmp_path / "a.json")])
    second = B.main(TINY + ["--json", str(tmp_path / "b.json")])
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    runs = first["runs"]
    assert len(runs) == 2 * len(B.ARMS)
    for r in runs:
        val = {float(b): v for b, v in r["val_ce"].items()}
        assert r["beta"] == min(val, key=lambda b: (val[b], b))  # the validation-best beta
        if r["arm"] == "kd_only":
            assert r["beta"] == 0.0 and list(val) == [0.0]
        else:
            assert sorted(val) == [0.1, 1.0]
    # the feature arms really differ from logit KD alone (the feature loss is applied)
    by = {(r["seed"], r["arm"]): r for r in runs}
    assert by[(0, "flex")]["val_ce"]["0.1"] != by[(0, "kd_only")]["val_ce"]["0.0"]
    assert "flex - random" in capsys.readouterr().out
