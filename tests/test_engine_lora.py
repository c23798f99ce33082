"""The "lora" part against independent computations, float64, on a tiny open_clip model.

The reference runs open_clip's OWN modules (the last blocks' ``nn.MultiheadAttention``, MLP,
norms, pooling and projections, through ``lora_features.finish``) with the adapters merged
into the weights, ``W + (alpha/r) B A``, by ``torch.func.functional_call``; theta is sliced
by hand in the order the definition gives; gradients, per-pair removal gradients and
Hessian-vector products come from plain autograd (double backward), and refits are real.
"""

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ecif.data import lora_features as lf
from ecif.data.tiny_clip import tiny_config
from ecif.engine.encoder_fit import fit_encoder
from ecif.engine.encoder_influence import ModelInverse, score_pass
from ecif.engine.encoder_model import EncoderObjective, loss_gradient, new_model
from ecif.engine.lora_part import LoraPart

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, BATCH, RANK = 16, 6, 2  # batches of 6, 6 and 4: padded slots
TARGETS = {  # the adapted weights: name -> open_clip's parameter in a block
    "attn_in": "attn.in_proj_weight",
    "attn_out": "attn.out_proj.weight",
    "mlp_fc": "mlp.c_fc.weight",
    "mlp_proj": "mlp.c_proj.weight",
}
CAPTIONS = [
    "a red circle", "two blue squares", "a small green triangle", "x", "one big yellow star",
    "red", "three circles on grey", "a square", "blue and red", "the triangle is green",
    "a star", "circle circle", "a very small square here", "green", "two stars", "big red",
]  # fmt: skip


def batch_loss(s):
    return -torch.log_softmax(s, 1).diagonal().sum() - torch.log_softmax(s, 0).diagonal().sum()


class Problem:
    """A tiny float64 CLIP (2 blocks a tower, 2 heads), its cached rows at block L-k, a part."""

    def __init__(self, k=1, blocks=None, seed=0):
        cfg = tiny_config(embed_dim=8, image_size=16, patch_size=8, vision_width=16,
                          vision_layers=2, text_width=16, text_layers=2, context_length=8)  # fmt: skip
        cfg["vision_cfg"]["head_width"] = 8
        cfg["text_cfg"]["heads"] = 2
        torch.manual_seed(seed)
        self.net = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
        self.net = self.net.eval().double()  # float32 weights, exact in float64
        g = torch.Generator().manual_seed(seed + 1)
        self.images = torch.randn(N, 3, 16, 16, generator=g, dtype=torch.float64)
        self.tokens = open_clip.tokenize(CAPTIONS, context_length=8)
        with torch.no_grad():
            self.fi, self.ft, _, _ = lf.encode(self.net, self.images, self.tokens, k)
        tensors, config = lf.lora_init(self.net, k)
        tensors = {n: t.double() for n, t in tensors.items()}
        self.part = LoraPart(tensors, config, math.log(5.0), rank=RANK, blocks=blocks, seed=3)
        self.k, self.blocks = k, blocks or k
        self.adapted = range(k - self.blocks, k)  # cached block j = model block L-k+j

    def names(self):
        """theta's pieces, in the definition's order: projections, adapters, temperature."""
        out = [("image_proj", (16, 8)), ("text_proj", (16, 8))]
        for side in ("image", "text"):
            for j in self.adapted:
                for t, (d_out, d_in) in (("attn_in", (48, 16)), ("attn_out", (16, 16)),
                                         ("mlp_fc", (64, 16)), ("mlp_proj", (16, 64))):  # fmt: skip
                    out += [
                        (f"{side}.{j}.{t}.A", (RANK, d_in)),
                        (f"{side}.{j}.{t}.B", (d_out, RANK)),
                    ]
        return out + [("log_scale", ())]

    def params(self, theta):
        """open_clip's parameter names -> tensors at theta (adapters merged)."""
        sizes = [math.prod(s) for _, s in self.names()]
        pieces = dict(zip([n for n, _ in self.names()], torch.split(theta, sizes)))
        p = {n: pieces[n].reshape(s) for n, s in self.names()}
        out = {"net.visual.proj": p["image_proj"], "net.text_projection": p["text_proj"]}
        for side, prefix in (("image", "net.visual.transformer"), ("text", "net.transformer")):
            for j in self.adapted:
                block = dict(self.net.named_parameters())  # the pretrained weights
                i = 2 - self.k + j
                for t, name in TARGETS.items():
                    full = f"{prefix}.resblocks.{i}.{name}"
                    w0 = block[full[4:]]
                    out[full] = w0 + p[f"{side}.{j}.{t}.B"] @ p[f"{side}.{j}.{t}.A"]
        return out, p["log_scale"]

    def embed(self, theta, rows):
        params, log_s = self.params(theta)
        finisher = _Finisher(self.net, self.k)
        with sdpa_kernel(SDPBackend.MATH):  # the composite attention: double backward works
            u, v = torch.func.functional_call(finisher, params, (self.fi[rows], self.ft[rows]))
        r_u, r_v = self.part.floors
        if r_u or r_v:  # the floored normalisation u / sqrt(|u|^2 + r^2)
            u = u / (u.pow(2).sum(-1, keepdim=True) + r_u**2).sqrt()
            v = v / (v.pow(2).sum(-1, keepdim=True) + r_v**2).sqrt()
            return u, v, log_s.exp()
        return F.normalize(u, dim=-1), F.normalize(v, dim=-1), log_s.exp()

    def logits(self, theta, rows):
        x, y, t = self.embed(theta, rows)
        return t * x @ y.T


class _Finisher(torch.nn.Module):
    def __init__(self, net, k):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, fi, ft):
        return lf.finish(self.net, fi, ft, self.k)


class Reference:
    """J and R_n from the definitions over the model's partition, at the reference logits."""

    def __init__(self, prob, model):
        self.prob, self.model = prob, model

    def batches(self):
        return [b[b >= 0] for b in self.model.partition.index]

    def objective(self, theta):
        total = sum(batch_loss(self.prob.logits(theta, b)) for b in self.batches())
        d = theta - self.model.theta0
        return total / self.model.n_norm + 0.5 * self.model.lam * d @ d

    def removal(self, theta, n, part="total"):
        b = next(b for b in self.batches() if n in b)
        s = self.prob.logits(theta, b)
        if part == "pos":
            i = int(np.nonzero(b == n)[0][0])
            return -torch.log_softmax(s, 1)[i, i] - torch.log_softmax(s, 0)[i, i]
        return batch_loss(s) - batch_loss(self.prob.logits(theta, b[b != n]))


def grad(fn, theta, create_graph=False):
    theta = theta.detach().requires_grad_(True) if not theta.requires_grad else theta
    return torch.autograd.grad(fn(theta), theta, create_graph=create_graph)[0]


def setup(k=1, blocks=None, lam=0.1, scale=0.05):
    prob = Problem(k, blocks)
    model = new_model(prob.part, N, lam=lam, batch_size=BATCH, seed=2, dtype=torch.float64)
    theta = model.theta0 + scale * torch.randn(
        model.num_params, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    return prob, model.with_theta(theta), Reference(prob, model)


@pytest.mark.parametrize("k,blocks", [(1, None), (2, 1)])
def test_part_is_the_model_at_theta0_and_open_clip_with_merged_adapters_elsewhere(k, blocks):
    prob, model, _ = setup(k, blocks)
    assert list(prob.part.layout.names) == [n for n, _ in prob.names()]
    assert list(prob.part.layout.shapes) == [s for _, s in prob.names()]
    theta0 = prob.part.initial()
    b = theta0[:-1].split([math.prod(s) for _, s in prob.names()[:-1]])
    assert all(not p.any() for (n, _), p in zip(prob.names(), b) if n.endswith(".B"))
    x, y, log_t = prob.part.embed(theta0, prob.fi, prob.ft)
    with torch.no_grad():
        ref_x = F.normalize(prob.net.encode_image(prob.images), dim=-1)
        ref_y = F.normalize(prob.net.encode_text(prob.tokens), dim=-1)
    torch.testing.assert_close(x, ref_x, rtol=0, atol=1e-13)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-13)
    assert float(log_t) == pytest.approx(math.log(5.0))
    rows = np.arange(N)
    x, y, _ = prob.part.embed(model.theta, prob.fi[None], prob.ft[None])  # a (1, N) stack
    rx, ry, _ = prob.embed(model.theta, rows)
    torch.testing.assert_close(x[0], rx, rtol=0, atol=1e-12)
    torch.testing.assert_close(y[0], ry, rtol=0, atol=1e-12)
    assert float((rx - ref_x).detach().abs().max()) > 1e-3  # the adapters moved it
    again = LoraPart.from_state(prob.part.state())
    torch.testing.assert_close(again.initial(), theta0, rtol=0, atol=0)
    torch.testing.assert_close(again.embed(model.theta, prob.fi, prob.ft)[0], x[0])
    padded = torch.cat([prob.fi[:3], torch.zeros_like(prob.fi[:1])])
    padded_t = torch.cat([prob.ft[:3], torch.zeros_like(prob.ft[:1])])
    px, py, _ = prob.part.embed(model.theta, padded, padded_t)
    assert not px[3].any() and not py[3].any()  # a padded slot embeds to zero


def test_objective_gradient_and_hessian_vector_products_equal_autograd():
    prob, model, ref = setup()
    theta = model.theta
    value, g = EncoderObjective(model, prob.fi, prob.ft).value_and_grad(theta)
    assert value == pytest.approx(float(ref.objective(theta)), rel=1e-12)
    torch.testing.assert_close(g, grad(ref.objective, theta), rtol=1e-9, atol=1e-12)
    v = torch.randn(2, model.num_params, generator=torch.Generator().manual_seed(5)).double()
    th = theta.detach().requires_grad_(True)
    g_ref = grad(ref.objective, th, create_graph=True)
    exact = EncoderObjective(model, prob.fi, prob.ft, curvature="exact").hvp(theta, v)
    gn = EncoderObjective(model, prob.fi, prob.ft, curvature="gauss_newton").hvp(theta, v)
    for i in range(2):  # double backward
        hv = torch.autograd.grad(g_ref @ v[i], th, retain_graph=True)[0]
        torch.testing.assert_close(exact[i], hv, rtol=1e-8, atol=1e-11)
        # Gauss-Newton: sum_b J_b^T H_S J_b v / N + lam v, J_b v by the double-vjp trick
        out = model.lam * v[i]
        for b in ref.batches():
            s = prob.logits(th, b)
            u = torch.zeros_like(s, requires_grad=True)
            jt_u = torch.autograd.grad(s, th, grad_outputs=u, create_graph=True)[0]
            jv = torch.autograd.grad(jt_u @ v[i], u)[0]
            h_s = torch.autograd.functional.hessian(batch_loss, s.detach())
            h_jv = (h_s.reshape(s.numel(), -1) @ jv.reshape(-1)).reshape(s.shape)
            out = out + torch.autograd.grad(s, th, grad_outputs=h_jv, retain_graph=True)[0] / N
        torch.testing.assert_close(gn[i], out, rtol=1e-8, atol=1e-11)


def test_jvp_scores_equal_brute_force_per_pair_removal_gradients():
    """(1/N) grad R_n^T w for every pair: the scoring pass's one JVP per chunk against one
    autograd backward per pair of the reference removal L_b(with n) - L_b(without n)."""
    prob, model, ref = setup()
    w = torch.randn(model.num_params, generator=torch.Generator().manual_seed(7)).double()
    d_pos, d_neg = score_pass(model, prob.fi, prob.ft, w)
    for n in range(N):
        total = grad(lambda th, n=n: ref.removal(th, n), model.theta) @ w
        pos = grad(lambda th, n=n: ref.removal(th, n, "pos"), model.theta) @ w
        assert (d_pos[n] + d_neg[n]) / N == pytest.approx(float(total) / N, rel=1e-8, abs=1e-12)
        assert d_pos[n] == pytest.approx(float(pos), rel=1e-8, abs=1e-11)


def test_removal_identity_holds_through_the_part():
    """L_b(with n) - L_b(without n) = Pos_n + Neg_n (exact form), the batch re-embedded by the
    part without n."""
    prob, model, ref = setup()
    for b in ref.batches():
        x, y, log_t = prob.part.embed(model.theta, prob.fi[b], prob.ft[b])
        s = log_t.exp() * x @ y.T
        p, q = torch.softmax(s, 1), torch.softmax(s, 0)
        for i in range(len(b)):
            pos = -torch.log(p[i, i]) - torch.log(q[i, i])
            neg = sum(
                -torch.log1p(-p[k, i]) - torch.log1p(-q[i, k]) for k in range(len(b)) if k != i
            )
            rest = np.delete(b, i)
            x2, y2, _ = prob.part.embed(model.theta, prob.fi[rest], prob.ft[rest])
            without = batch_loss(log_t.exp() * x2 @ y2.T)
            assert float(batch_loss(s) - without) == pytest.approx(float(pos + neg), rel=1e-10)


@pytest.mark.slow  # ~5 min on a loaded 2-core machine: three fits, each ~600 passes, mostly
def test_fit_is_stationary_and_a_warm_refit_without_a_pair_matches_a_cold_one():  # exact HVPs
    """With the normalisation floor (5% of the median pretrained norm, as ``model_mode``):
    without it the fit drives an image's projected feature through 0, where CLIP's
    normalisation jumps (seen here: the objective jumped by 0.5 over a step of 1e-6)."""
    prob, _, _ = setup()
    with torch.no_grad():
        u, v = lf.finish(prob.net, prob.fi, prob.ft, prob.k)
    prob.part.floors = (
        0.05 * float(u.norm(dim=-1).median()),
        0.05 * float(v.norm(dim=-1).median()),
    )
    start = new_model(prob.part, N, lam=1.0, batch_size=BATCH, seed=2, dtype=torch.float64)
    model = fit_encoder(start, prob.fi, prob.ft)
    assert model.info["converged"], model.info
    g_ref = grad(Reference(prob, model).objective, model.theta)
    assert float(g_ref.abs().max()) < 1e-8 and float(g_ref.norm()) < 1e-7
    assert float((model.theta - model.theta0).abs().max()) > 1e-3  # it moved
    drop = np.array([5])
    warm = fit_encoder(start, prob.fi, prob.ft, init=model, exclude_positions=drop)
    cold = fit_encoder(start, prob.fi, prob.ft, exclude_positions=drop)
    assert warm.info["converged"] and cold.info["converged"]
    assert warm.partition.index.tolist() == cold.partition.index.tolist()
    assert 5 not in warm.partition.members()
    torch.testing.assert_close(warm.theta, cold.theta, rtol=0, atol=1e-7)
    assert float((warm.theta - model.theta).abs().max()) > 1e-5  # the removal moved the fit
    # and the solve at the fit: (H + lam) w = g by CG, preconditioned
    g = torch.randn(model.num_params, generator=torch.Generator().manual_seed(8)).double()
    inv = ModelInverse(model, prob.fi, prob.ft, tol=1e-12, max_iter=2000)
    w = inv.solve(g)
    assert inv.info["converged"] and inv.info["curvature"] == "exact"
    obj = EncoderObjective(model, prob.fi, prob.ft, curvature="exact")
    torch.testing.assert_close(obj.hvp(model.theta, w), g, rtol=1e-8, atol=1e-10)


def test_model_mode_builds_the_lora_part_from_a_cache_record_and_scores_through_it():
    """``ModelArgs(params="lora")``: the part from a cache's init record (float16 rows as
    stored), the normalisation floors from its pretrained norms, scores that are the JVP
    pass's, and a one-line error for a cache of the other kind."""
    from types import SimpleNamespace

    from ecif.engine.model_mode import ModelArgs, make_part, score_model

    prob = Problem()
    tensors, config = lf.lora_init(prob.net, 1)
    init = {"kind": "lora", "tensors": tensors, "config": config, "log_scale": math.log(5.0)}
    rows = SimpleNamespace(image=prob.fi.numpy().astype(np.float16),
                           text=prob.ft.numpy().astype(np.float16), ids=np.arange(N))  # fmt: skip
    args = ModelArgs(params="lora", lora_rank=3, lam=1.0, batch_size=BATCH, dtype="float64")
    part = make_part(init, args, rows)
    assert isinstance(part, LoraPart) and part.rank == 3 and part.blocks == 1
    with torch.no_grad():
        u, _ = lf.finish(prob.net, prob.fi, prob.ft, 1)
    assert part.floors[0] == pytest.approx(0.05 * float(u.norm(dim=-1).median()), rel=1e-2)
    with pytest.raises(ValueError, match="params='projection' with a 'lora' feature cache"):
        make_part(init, ModelArgs(params="projection"))
    model = new_model(part, N, lam=1.0, batch_size=BATCH, seed=2, dtype=torch.float64)
    fi, ft = (torch.from_numpy(a.astype(np.float64)) for a in (rows.image, rows.text))
    df = score_model(model, rows, rows)
    w = ModelInverse(model, fi, ft).solve(loss_gradient(model, fi, ft))
    d_pos, d_neg = score_pass(model, fi, ft, w)
    np.testing.assert_allclose(df["influence"], (d_pos + d_neg) / N, rtol=1e-4, atol=1e-9)
    assert df.attrs["params"] == "lora" and np.isfinite(df["influence"]).all()


def test_kfac_moments_are_the_adapted_maps_inputs_in_open_clips_own_modules():
    """The preconditioner's factors: E[h h^T] of what open_clip's own c_fc / c_proj read in
    the adapted block (hooks, adapters merged), B's of h A^T; and its pieces invert."""
    from ecif.engine.encoder_precondition import KroneckerPreconditioner

    prob, model, _ = setup()
    seen = {}
    i = 2 - prob.k  # the adapted model block
    for side, tower in (("image", prob.net.visual.transformer), ("text", prob.net.transformer)):
        mlp = tower.resblocks[i].mlp
        for t, mod in (("mlp_fc", mlp.c_fc), ("mlp_proj", mlp.c_proj)):
            mod.register_forward_pre_hook(
                lambda m, a, key=f"{side}.0.{t}": seen.update({key: a[0]})
            )
    params, _ = prob.params(model.theta)
    with torch.no_grad():
        torch.func.functional_call(_Finisher(prob.net, prob.k), params, (prob.fi, prob.ft))
        got = prob.part.kfac_inputs(model.theta, prob.fi, prob.ft)
    p = prob.part.layout.unflatten(model.theta)
    keep = int(prob.ft[:, 0].round().max()) + 1  # the part runs text up to the last EOT
    for key, h in seen.items():
        if key.startswith("text"):  # (N, tokens, width): open_clip runs the whole context
            h = h[:, :keep]
        h = h.reshape(-1, h.shape[-1])
        for name, x in ((f"{key}.A", h), (f"{key}.B", h @ p[f"{key}.A"].T)):
            moment, axis = got[name]
            assert axis == 1
            torch.testing.assert_close(moment, x.T @ x / len(x), rtol=1e-10, atol=1e-12)
    assert {n for n in prob.part.layout.names if n.endswith((".A", ".B", "_proj"))} == set(got)
    pre = KroneckerPreconditioner(EncoderObjective(model, prob.fi, prob.ft), model.theta)
    v = torch.randn(2, model.num_params, generator=torch.Generator().manual_seed(9)).double()
    torch.testing.assert_close(pre.sqrt(pre.inverse_sqrt(v)), v)
    torch.testing.assert_close(pre(v), pre.inverse_sqrt(pre.inverse_sqrt(v)))
    assert float(v[0] @ pre(v[1])) == pytest.approx(float(v[1] @ pre(v[0])), rel=1e-10)
