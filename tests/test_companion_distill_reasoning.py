"""Validity-calibrated reasoning distillation: task checker, weights, plain-KD equivalence."""

import random

import pytest
import torch

from ecif.companions import tasks as T
from ecif.companions.reasoning_kd import (
    CalibratedKDConfig,
    build_calibrated_batch,
    calibrated_kd_loss,
    checker_validity,
    filter_valid_traces,
    response_mask,
    rollout_validity,
    sample_traces,
    step_token_weights,
    validity_weights,
)
from ecif.companions.toy_lm import LMConfig, TinyLM, generate, pad_batch
from ecif.grad import masked_divergence

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
