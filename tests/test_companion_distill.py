"""Shared divergences, gradient-of-activation scores and the Flex-KD losses."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecif.companions import tasks as T
from ecif.companions.flexkd import (
    FlexKDConfig,
    LinearProjector,
    flexkd_loss,
    pearson_loss,
    select_random_dims,
    select_top_dims,
    task_ce,
    teacher_dimension_scores,
    teacher_directions,
)
from ecif.companions.toy_lm import LMConfig, TinyLM, freeze
from ecif.grad import (
    activation_and_grad,
    dimension_scores,
    forward_kl,
    generalized_jsd,
    gradient_second_moment,
    masked_divergence,
    reverse_kl,
    token_divergence,
    top_directions,
)


def _logits(seed, shape=(3, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 2


def _mask():
    m = torch.ones(3, 5)
    m[0, 3:] = 0
    m[2, :2] = 0
    return m


# ----------------------------------------------------------------- divergences


def test_forward_and_reverse_kl_match_torch_kl_div_on_unmasked_positions():
    s, t, m = _logits(0), _logits(1), _mask()
    keep = m.bool()
    ls, lt = F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1)
    ref_f = F.kl_div(ls, lt, log_target=True, reduction="batchmean")  # KL(p_T || p_S)
    ref_r = F.kl_div(lt, ls, log_target=True, reduction="batchmean")  # KL(p_S || p_T)
    assert torch.allclose(masked_divergence(s, t, m, "fkl"), ref_f, atol=1e-12)
    assert torch.allclose(masked_divergence(s, t, m, "rkl"), ref_r, atol=1e-12)
    assert not torch.allclose(ref_f, ref_r)  # the two directions really differ here
    per_tok = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(forward_kl(s, t)[keep], per_tok, atol=1e-12)
    assert torch.allclose(reverse_kl(s, t), forward_kl(t, s), atol=1e-12)


def test_masked_positions_do_not_matter():
    s, t, m = _logits(0), _logits(1), _mask()
    s2 = s.clone()
    s2[~m.bool()] = 100.0 * torch.randn_like(s2[~m.bool()])
    for kind in ("fkl", "rkl", "jsd"):
        assert torch.allclose(masked_divergence(s, t, m, kind), masked_divergence(s2, t, m, kind))


def test_jsd_matches_numpy_and_its_bounds():
    s, t = _logits(2), _logits(3)
    p = F.softmax(t, -1).numpy()
    q = F.softmax(s, -1).numpy()
    for beta in (0.5, 0.2, 0.9):
        mix = beta * p + (1 - beta) * q
        ref = beta * (p * np.log(p / mix)).sum(-1) + (1 - beta) * (q * np.log(q / mix)).sum(-1)
        got = generalized_jsd(s, t, beta).numpy()
        assert np.allclose(got, ref, atol=1e-12)
    jsd = generalized_jsd(s, t, 0.5)
    assert torch.allclose(jsd, generalized_jsd(t, s, 0.5), atol=1e-12)  # symmetric
    assert bool((jsd >= 0).all()) and bool((jsd <= math.log(2) + 1e-12).all())
    assert torch.allclose(generalized_jsd(s, s, 0.3), torch.zeros(3, 5, dtype=s.dtype), atol=1e-12)
    with pytest.raises(ValueError):
        generalized_jsd(s, t, 1.0)
    with pytest.raises(ValueError):
        token_divergence(s, t, "tv")


def test_temperature_and_weights():
    s, t, m = _logits(4), _logits(5), _mask()
    hot = masked_divergence(s, t, m, "fkl", temperature=2.0)
    assert torch.allclose(hot, masked_divergence(s / 2, t / 2, m, "fkl"))
    w = torch.rand(3, 5, dtype=torch.float64)
    per = forward_kl(s, t)
    assert torch.allclose(
        masked_divergence(s, t, m, "fkl", weights=w), (per * w * m).sum() / m.sum()
    )


# ----------------------------------------------------------------- gradient scores


def _tiny_teacher():
    torch.manual_seed(0)
    model = TinyLM(LMConfig(T.VOCAB_SIZE, d_model=8, n_layers=1, n_heads=2, max_len=12)).double()
    return freeze(model)


def _ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, T.VOCAB_SIZE, (2, 6), generator=g)


def _loss_and_mask(model, ids):
    logits, _ = model(ids)
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, T.VOCAB_SIZE), ids[:, 1:].reshape(-1), reduction="none"
    )
    sup = torch.zeros(2, 5, dtype=torch.float64)
    sup[:, 2:] = 1  # supervise the last three predictions only
    mask = F.pad(sup, (0, 1))
    return (ce * sup.reshape(-1)).sum(), mask


def test_activation_grads_and_scores_equal_finite_differences():
    model, ids = _tiny_teacher(), _ids()
    act, grad = activation_and_grad(model.final_norm, lambda: _loss_and_mask(model, ids)[0])
    assert all(p.grad is None for p in model.parameters())  # frozen model stays untouched
    # Brute force: one replica of the batch per (coordinate, sign), all in a single forward.
    eps, n = 1e-6, act.numel()
    bump = torch.zeros(2 * n, *act.shape, dtype=act.dtype)
    flat = bump.view(2 * n, -1)
    flat[torch.arange(n), torch.arange(n)] = eps
    flat[n + torch.arange(n), torch.arange(n)] = -eps
    hook = model.final_norm.register_forward_hook(
        lambda _m, _i, out: out + bump.reshape(-1, *act.shape[1:])
    )
    with torch.no_grad():
        logits, _ = model(ids.repeat(2 * n, 1))
    hook.remove()
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, T.VOCAB_SIZE),
        ids[:, 1:].repeat(2 * n, 1).reshape(-1),
        reduction="none",
    ).reshape(2 * n, -1)
    sup = _loss_and_mask(model, ids)[1][:, :-1].reshape(1, -1)
    per_replica = (ce * sup).sum(1)
    fd = ((per_replica[:n] - per_replica[n:]) / (2 * eps)).reshape(act.shape)
    assert torch.allclose(grad, fd, atol=1e-7)
    mask = _loss_and_mask(model, ids)[1]
    assert fd[~mask.bool()].abs().max() < 1e-7  # unsupervised positions get no gradient
    got = teacher_dimension_scores(model.final_norm, [ids], lambda b: _loss_and_mask(model, b))
    assert torch.allclose(got, fd.abs().sum((0, 1)), atol=1e-7)
    sq = teacher_dimension_scores(
        model.final_norm, [ids, ids], lambda b: _loss_and_mask(model, b), "squared"
    )
    assert torch.allclose(sq, 2 * fd.square().sum((0, 1)), atol=1e-9)
    gxa = dimension_scores(grad, mask, "grad_x_act", act)
    assert torch.allclose(gxa, (fd * act).abs().sum((0, 1)), atol=1e-7)


def test_scores_find_the_dimensions_the_loss_reads():
    model = _tiny_teacher()
    with torch.no_grad():
        model.head.weight[:, [0, 1, 2, 4, 6]] = 0.0  # logits read only dims 3, 5, 7
    ids = _ids()
    scores = teacher_dimension_scores(model.final_norm, [ids], lambda b: _loss_and_mask(model, b))
    sel = select_top_dims(scores, 3)
    assert sorted(sel.dims.tolist()) == [3, 5, 7]
    assert scores[[0, 1, 2, 4, 6]].abs().max() == 0
    rand = select_random_dims(8, 3, torch.Generator().manual_seed(0))
    assert len(set(rand.dims.tolist())) == 3
    dirs = teacher_directions(model.final_norm, [ids], lambda b: _loss_and_mask(model, b), 3)
    assert dirs.basis.shape == (8, 3)
    assert torch.allclose(dirs.basis[[0, 1, 2, 4, 6]].float(), torch.zeros(5, 3), atol=1e-6)


def test_top_directions_recover_a_planted_direction():
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(6, generator=g, dtype=torch.float64), dim=0)
    grads = torch.randn(200, 1, generator=g, dtype=torch.float64) * 5 * u + 0.1 * torch.randn(
        200, 6, generator=g, dtype=torch.float64
    )
    top = top_directions(gradient_second_moment(grads), 1)[:, 0]
    assert abs(float(top @ u)) > 0.99
    with pytest.raises(ValueError):
        dimension_scores(grads, mode="grad_x_act")


# ----------------------------------------------------------------- Flex-KD losses


def test_pearson_loss_is_scale_free_and_matches_numpy():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(50, 4, generator=g, dtype=torch.float64)
    t = s * torch.tensor([3.0, 0.1, 7.0, 2.0], dtype=s.dtype) + 5.0
    assert float(pearson_loss(s, t, eps=0.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(pearson_loss(s, -t, eps=0.0)) == pytest.approx(2.0, abs=1e-12)
    u = torch.randn(50, 4, generator=g, dtype=torch.float64)
    ref = np.mean([1 - np.corrcoef(s[:, j], u[:, j])[0, 1] for j in range(4)])
    assert float(pearson_loss(s, u, eps=0.0)) == pytest.approx(ref, abs=1e-12)


def test_flexkd_loss_parts_and_baselines():
    g = torch.Generator().manual_seed(0)
    s_log, t_log = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    s_h = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    t_h = torch.randn(2, 4, 10, generator=g)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]])
    sel = select_top_dims(torch.arange(10.0), 3)
    plain, parts = flexkd_loss(
        s_log, s_h, t_log, t_h, labels, mask, FlexKDConfig(beta=0.0), selection=sel
    )
    assert float(plain.detach()) == pytest.approx(parts["task"] + parts["kd"])
    assert parts["task"] == pytest.approx(float(task_ce(s_log, labels, mask)))
    full, parts = flexkd_loss(
        s_log, s_h, t_log, t_h, labels, mask, FlexKDConfig(beta=2.0), selection=sel
    )
    keep = mask.bool()
    ref_feat = pearson_loss(s_h[keep], t_h[keep][:, [9, 8, 7]])
    assert float((full - plain).detach()) == pytest.approx(2.0 * float(ref_feat.detach()), rel=1e-5)
    full.backward()
    assert s_h.grad is not None and s_h.grad[~keep].abs().max() == 0
    proj = LinearProjector(3, 10)
    _, parts = flexkd_loss(s_log, s_h, t_log, t_h, labels, mask, FlexKDConfig(), projector=proj)
    assert parts["feat"] == pytest.approx(float(F.mse_loss(proj(s_h[keep]), t_h[keep]).detach()))
    with pytest.raises(ValueError):
        flexkd_loss(
            s_log,
            s_h,
            t_log,
            t_h,
            labels,
            mask,
            FlexKDConfig(),
            selection=select_top_dims(torch.arange(10.0), 4),
        )
