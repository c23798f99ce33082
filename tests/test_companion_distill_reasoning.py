"""Validity-calibrated reasoning distillation: task checker, weights, plain-KD equivalence."""

import random

import pytest
import torch

from ecif.companions import reasoning_kd as RK
from ecif.companions import tasks as T
from ecif.companions.reasoning_kd import (
    CalibratedKDConfig,
    author_validities,
    build_calibrated_batch,
    calibrated_kd_loss,
    checker_validity,
    filter_answer_traces,
    filter_valid_traces,
    response_mask,
    rollout_validity,
    sample_traces,
    step_token_weights,
    validity_weights,
)
from ecif.companions.toy_lm import LMConfig, TinyLM, generate, pad_batch
from ecif.grad import masked_divergence

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = T.AdditionTask(n_operands=4)


def _enc(text):
    table = {"+": T.PLUS, "=": T.EQ, ";": T.SEP, "$": T.EOS, "^": T.BOS}
    return [table[c] if c in table else T.DIGIT0 + int(c) for c in text]


# ----------------------------------------------------------------- task and checker


def test_gold_traces_are_valid_and_corrupted_steps_are_caught():
    rng = random.Random(0)
    seen_error = False
    for _ in range(200):
        ops = TASK.sample(rng)
        gold = T.format_trace(ops, T.sample_states(ops, rng))
        ok, n = T.trace_valid(gold)
        assert ok == n == TASK.n_operands - 1
        assert T.final_answer(gold) == sum(ops)
        assert T.decode(gold).startswith("^") and T.decode(gold).endswith("$")
        bad = T.format_trace(ops, T.sample_states(ops, rng, carry_error=1.0))
        ok, n = T.trace_valid(bad)
        if T.final_answer(bad) != sum(ops):
            seen_error = True
            assert ok < n  # every wrong answer is traced to an invalid step
    assert seen_error
    assert filter_valid_traces([gold], [sum(ops)]) == [gold]
    assert filter_valid_traces([gold], [sum(ops) + 1]) == []


def test_check_step_table():
    state = T.state_before(_enc("^9+8+5="))
    assert state == [9, 8, 5]
    assert T.check_step(state, _enc("17+5;"))
    assert T.check_step(state, _enc("9+13;"))  # another valid order
    assert not T.check_step(state, _enc("9+3;"))  # dropped carry
    assert not T.check_step(state, _enc("14+8;"))  # non-adjacent merge
    assert not T.check_step(state, _enc("17+5$"))  # ends too early
    assert not T.check_step(state, _enc("22;"))  # two merges at once
    assert not T.check_step(state, _enc("17+5"))  # cut before the separator
    assert T.state_before(_enc("^9+8+5=17+5;")) == [17, 5]
    assert T.check_step([17, 5], _enc("22$"))
    assert not T.check_step([17, 5], _enc("22;"))
    assert T.parse_terms(_enc("07")) is None and T.parse_terms(_enc("1++2")) is None
    ids = _enc("^9+8+5=17+5;22$")
    assert T.step_spans(ids) == [(7, 12), (12, 15)]
    assert T.final_answer(ids) == 22 and T.final_answer(_enc("^9+8+5=17+5;")) is None


def test_generate_matches_stepwise_argmax_for_ragged_prefixes():
    torch.manual_seed(0)
    model = TinyLM(LMConfig(T.VOCAB_SIZE, d_model=16, n_layers=1, n_heads=2))
    prefixes = [_enc("^9+8+5="), _enc("^1+2=3$"), _enc("^4+4+4+4=8+4+4;")]
    got = generate(model, prefixes, 5, [T.EOS], greedy=True)
    for pre, cont in zip(prefixes, got):
        seq = list(pre)
        for tok in cont:
            logits, _ = model(torch.tensor([seq]))
            assert int(logits[0, -1].argmax()) == tok
            seq.append(tok)
        assert len(cont) == 5 or cont[-1] == T.EOS


# ----------------------------------------------------------------- weights


def test_weights_follow_the_validity_table():
    vt = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.75])
    vs = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.25])
    w = validity_weights(vt, vs, "linear")
    assert w.tolist() == [1.0, 0.5, 0.5, 0.0, 0.75]
    sig = validity_weights(vt, vs, "sigmoid", sigmoid_scale=6.0)
    assert sig[1] == sig[2] == 0.5 and sig[0] > 0.99 and sig[3] < 0.01
    assert validity_weights(vt, vs, "linear", floor=0.1)[3] == pytest.approx(0.1)
    assert validity_weights(vt, vs, "none").tolist() == [1.0] * 5
    live = vt.clone().requires_grad_()
    assert not validity_weights(live, vs).requires_grad  # detached
    with pytest.raises(ValueError):
        validity_weights(vt, vs, "cosine")
    tok = step_token_weights([[(2, 4), (4, 5)], [(1, 3)]], [[0.5, 1.0], [0.0]], 6)
    assert tok.tolist() == [[0, 0, 0.5, 0.5, 1.0, 0], [0, 0, 0, 0, 0, 0]]


def _pair(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 7, T.VOCAB_SIZE, generator=g, requires_grad=True)
    t = torch.randn(3, 7, T.VOCAB_SIZE, generator=g)
    mask = torch.zeros(3, 7)
    mask[0, 2:6] = mask[1, 3:] = mask[2, 1:4] = 1
    return s, t, mask


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_unit_weights_reproduce_plain_kd_exactly(kind):
    s, t, mask = _pair(0)
    cfg = CalibratedKDConfig(divergence=kind)
    ours = calibrated_kd_loss(s, t, mask, torch.ones_like(mask), cfg)
    (g_ours,) = torch.autograd.grad(ours, s)
    plain = masked_divergence(s[:, :-1], t[:, :-1], mask[:, 1:], kind)
    (g_plain,) = torch.autograd.grad(plain, s)
    assert torch.equal(ours, plain) and torch.equal(g_ours, g_plain)
    half = calibrated_kd_loss(s, t, mask, 0.5 * mask, cfg)
    assert torch.allclose(half, 0.5 * plain)
    w = torch.rand(3, 7, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(calibrated_kd_loss(s, t, mask, w, cfg), plain)
    by_w = CalibratedKDConfig(divergence=kind, normalize="weights")
    assert torch.equal(calibrated_kd_loss(s, t, mask, torch.ones_like(mask), by_w), plain)
    assert torch.allclose(calibrated_kd_loss(s, t, mask, 0.5 * mask, by_w), plain)
    ref = (
        masked_divergence(s[:, :-1], t[:, :-1], mask[:, 1:], kind, weights=w[:, 1:])
        * mask[:, 1:].sum()
        / (w[:, 1:] * mask[:, 1:]).sum()
    )
    assert torch.allclose(calibrated_kd_loss(s, t, mask, w, by_w), ref)
    with pytest.raises(ValueError):
        calibrated_kd_loss(s, t, mask, w, CalibratedKDConfig(normalize="batch"))


# ----------------------------------------------------------------- batches and estimators


def _models():
    torch.manual_seed(0)
    teacher = TinyLM(LMConfig(T.VOCAB_SIZE, d_model=16, n_layers=1, n_heads=2))
    student = TinyLM(LMConfig(T.VOCAB_SIZE, d_model=8, n_layers=1, n_heads=2))
    return teacher, student


def test_build_batch_weights_and_plain_mode():
    teacher, student = _models()
    rng = random.Random(0)
    probs = [TASK.sample(rng) for _ in range(4)]
    gen = torch.Generator().manual_seed(0)
    b = build_calibrated_batch(teacher, student, probs, CalibratedKDConfig(), TASK, rng, gen)
    assert b.ids.shape[0] == 4 and b.token_weights.shape == b.ids.shape
    assert b.v_teacher.numel() == b.v_student.numel() > 0
    assert bool(((b.token_weights >= 0) & (b.token_weights <= 1)).all())
    assert bool((b.token_weights[b.target_mask == 0] == 0).all())
    plain = build_calibrated_batch(
        teacher, student, probs, CalibratedKDConfig(weighting="none"), TASK, rng, gen
    )
    assert torch.equal(plain.token_weights, plain.target_mask)
    traces = [t.tolist() for t in plain.ids]
    assert torch.equal(plain.target_mask, response_mask(traces, plain.ids.shape[1]))


def test_validity_estimators():
    teacher, _ = _models()
    prefixes = [_enc("^9+8+5="), _enc("^9+8+5="), _enc("^9+8+5=17+5;"), _enc("^9+8+5=")]
    steps = [_enc("17+5;"), _enc("9+3;"), _enc("22$"), _enc("17+5")]
    assert checker_validity(prefixes, steps).tolist() == [1.0, 0.0, 1.0, 0.0]
    v = rollout_validity(
        teacher, prefixes, steps, [22] * 4, n_rollouts=4, generator=torch.Generator().manual_seed(0)
    )
    assert v[2] == 1.0 and v[3] == 0.0  # finished step judged by its answer; cut step is 0
    assert bool(((v * 4) == (v * 4).round()).all()) and bool(((v >= 0) & (v <= 1)).all())
    traces = sample_traces(teacher, [[1, 2, 3]], torch.Generator().manual_seed(0))
    assert traces[0][: len(T.prompt([1, 2, 3]))] == T.prompt([1, 2, 3])
    ids, lens = pad_batch([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and lens.tolist() == [3, 1]


# ----------------------------------------------------------------- own-step proposals


def test_author_validities_put_the_own_step_on_its_authors_side():
    v_own = torch.tensor([1.0, 0.0, 1.0, 0.0])
    v_other = torch.tensor([0.0, 1.0, 1.0, 1.0])
    vt, vs = author_validities(v_own, v_other, [False, False, True, True])
    assert vt.tolist() == [1.0, 0.0, 1.0, 1.0] and vs.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert validity_weights(vt, vs).tolist() == [1.0, 0.0, 0.5, 1.0]


# a teacher trace whose first step drops the carry (8+5 -> 3), then two valid steps
_TEACHER_TRACE = "^9+8+5+3=9+3+3;12+3;15$"
_STUDENT_TRACE = "^9+8+5+3=17+5+3;17+8;24$"  # last step wrong (17+8 = 25)


def _fixed_models(monkeypatch, from_student):
    """Tiny models whose traces and proposals are fixed by hand: the teacher proposes the
    first merge with the carry dropped (invalid), the student the correct first merge."""
    teacher, student = _models()
    traces = {id(teacher): _enc(_TEACHER_TRACE), id(student): _enc(_STUDENT_TRACE)}
    first = {id(teacher): _enc("9+3+3;"), id(student): _enc("17+5+3;")}
    calls = []

    def fake_traces(model, problems, generator=None, temperature=1.0, greedy=False):
        return [list(traces[id(model)]) for _ in problems]

    def fake_propose(model, prefixes, task, generator=None, temperature=1.0):
        calls.append((id(model) == id(teacher), len(prefixes)))
        out = []
        for p in prefixes:
            state = T.state_before(p)
            if len(state) == 4:
                out.append(list(first[id(model)]))
            else:  # later steps: the correct merge of the first pair
                rest = [state[0] + state[1]] + state[2:]
                out.append(T.terms_tokens(rest) + [T.SEP if len(rest) > 1 else T.EOS])
        return out

    monkeypatch.setattr(RK, "sample_traces", fake_traces)
    monkeypatch.setattr(RK, "propose_steps", fake_propose)
    frac = 1.0 if from_student else 0.0
    return teacher, student, frac, calls


@pytest.mark.parametrize("from_student", [False, True])
def test_own_step_weights_by_hand(monkeypatch, from_student):
    teacher, student, frac, calls = _fixed_models(monkeypatch, from_student)
    cfg = CalibratedKDConfig(proposals="own", student_prefix_frac=frac)
    b = build_calibrated_batch(teacher, student, [[9, 8, 5, 3]], cfg, TASK, random.Random(0))
    if not from_student:
        # own steps (teacher): invalid, valid, valid; student proposals: all valid
        assert b.v_teacher.tolist() == [0.0, 1.0, 1.0]
        assert b.v_student.tolist() == [1.0, 1.0, 1.0]
        step_w, spans = [0.0, 0.5, 0.5], T.step_spans(_enc(_TEACHER_TRACE))
        assert calls == [(False, 3)]  # only the student proposes
    else:
        # own steps (student): valid, valid, invalid; teacher proposals: invalid, valid, valid
        assert b.v_student.tolist() == [1.0, 1.0, 0.0]
        assert b.v_teacher.tolist() == [0.0, 1.0, 1.0]
        step_w, spans = [0.0, 0.5, 1.0], T.step_spans(_enc(_STUDENT_TRACE))
        assert calls == [(True, 3)]  # only the teacher proposes
    ref = torch.zeros_like(b.token_weights)
    for (s, e), w in zip(spans, step_w):
        ref[0, s:e] = w
    assert torch.equal(b.token_weights, ref)


def test_sampled_proposals_ignore_the_distilled_step(monkeypatch):
    teacher, student, frac, calls = _fixed_models(monkeypatch, True)
    cfg = CalibratedKDConfig(proposals="sampled", student_prefix_frac=frac)
    b = build_calibrated_batch(teacher, student, [[9, 8, 5, 3]], cfg, TASK, random.Random(0))
    # the student trace's wrong last step (24) is not what is scored: its fresh proposal (25)
    # is, so the last step gets w = 1/2 where own-step gives 1
    assert b.v_student.tolist() == [1.0, 1.0, 1.0] and b.v_teacher.tolist() == [0.0, 1.0, 1.0]
    assert calls == [(True, 3), (False, 3)]
    s, e = T.step_spans(_enc(_STUDENT_TRACE))[-1]
    assert b.token_weights[0, s:e].tolist() == [0.5] * (e - s)
    with pytest.raises(ValueError):
        bad = CalibratedKDConfig(proposals="both", student_prefix_frac=frac)
        build_calibrated_batch(teacher, student, [[9, 8, 5, 3]], bad, TASK, random.Random(0))


def test_own_step_on_real_models_scores_the_traces_own_steps():
    teacher, student = _models()
    rng = random.Random(1)
    probs = [TASK.sample(rng) for _ in range(6)]
    gen, pgen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    cfg = CalibratedKDConfig(proposals="own", student_prefix_frac=0.0)
    b = build_calibrated_batch(teacher, student, probs, cfg, TASK, rng, gen, pgen)
    own = []
    for row in b.ids.tolist():
        own += [T.check_step(T.state_before(row[:s]), row[s:e]) for s, e in T.step_spans(row)]
    assert b.v_teacher.tolist() == [float(v) for v in own]
    w = (1 + b.v_teacher - b.v_student) / 2
    firsts = [(r, s) for r, row in enumerate(b.ids.tolist()) for s, _ in T.step_spans(row)]
    assert [float(b.token_weights[r, s]) for r, s in firsts] == w.tolist()


def test_answer_filter_keeps_right_answers_whatever_the_steps():
    # 9+8 written as 7 (invalid) then 7+5 as 22 (invalid): two wrong steps, right answer 22
    lucky = _enc("^9+8+5=7+5;22$")
    right, wrong = _enc("^9+8+5=17+5;22$"), _enc("^9+8+5=9+3;12$")
    unfinished = _enc("^9+8+5=17+5;")
    got = filter_answer_traces([lucky, right, wrong, unfinished], [22] * 4)
    assert got == [lucky, right]
    assert filter_valid_traces([lucky, right, wrong, unfinished], [22] * 4) == [right]
