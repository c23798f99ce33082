"""The streamed minibatch warm-up before the full-batch fit (issue 6): same optimum, fewer passes."""

import numpy as np
import pytest
import torch

import ecif
from ecif.engine import warmup as wu
from ecif.engine.batches import make_partition
from ecif.engine.fit import FitArgs, fit_head, new_head
from tests.engine_reference import Reference, synthetic_pairs

# Forced onto the L-BFGS path (the warm-up's path; auto would pick Newton for these widths).
KW = dict(batch_size=32, lam=1e-2, logit_scale=20.0, dtype="float64", optimizer="lbfgs")


def noisy_copies(n, d, seed):
    """bench_scale.py's pairs: unit x, y = normalize(x + 0.8 noise)."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x + 0.8 * g.standard_normal((n, d))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x, y


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rotated():
    x, y, _ = synthetic_pairs(2000, 8, noise=0.2, seed=1)
    train = ecif.EmbeddingSet(x, y)
    cold = ecif.fit(train, warmup_epochs=0, **KW)
    return train, cold


def test_warm_fit_reaches_the_tolerance_and_the_cold_optimum(rotated):
    train, cold = rotated
    warm = ecif.fit(train, warmup_epochs=2, **KW)
    assert cold.info["warmup"] is None and warm.info["warmup"]["epochs"] == 2
    ref = Reference(warm, train.image, train.text)
    for head in (cold, warm):  # stationary for an independent autograd objective
        g = torch.func.grad(ref.objective)(head.theta())
        assert float(g.abs().max()) < 1e-8
        assert head.info["converged"] and head.info["tol"] == 1e-9  # grad max <= 10 tol
        assert head.info["grad_max"] <= 10 * head.info["tol"]
    # strongly convex with modulus lam: |theta_w - theta_c| <= |g_w - g_c| / lam
    assert float((warm.m - cold.m).abs().max()) < 1e-7
    # and the same point as the dense-Hessian Newton solver reaches
    newton = ecif.fit(train, **{**KW, "optimizer": "newton"})
    assert float((warm.m - newton.m).abs().max()) < 1e-7


def test_warm_up_lowers_the_full_passes():
    # lam 1e-3, logit scale 100; tol 1e-8 is about where float64 line searches stall here
    kw = dict(batch_size=32, dtype="float64", optimizer="lbfgs", tol=1e-8)
    cold_passes = warm_passes = 0
    for seed in (0, 1):
        x, y = noisy_copies(10_000, 16, seed)
        cold = ecif.fit((x, y), warmup_epochs=0, **kw)
        warm = ecif.fit((x, y), warmup_epochs=2, **kw)
        assert cold.info["converged"]  # grad max <= 10 tol (measured 1.0e-8, 1.1e-8)
        assert warm.info["grad_max"] <= 1e-8  # the tolerance itself (measured 1e-8, 6e-9)
        assert float((warm.m - cold.m).abs().max()) < 1e-7  # measured 2e-10
        cold_passes += cold.info["evaluations"]
        warm_passes += warm.info["evaluations"]
        info = warm.info["warmup"]
        assert info["steps"] == 2 * -(-10_000 // 32) and info["batches_per_step"] == 1
        # it went downhill from J(M0), computed independently on the first pair set
        if seed == 0:
            j0 = float(Reference(cold, x, y).objective(cold.m0.reshape(-1)))
            assert info["last_epoch_objective"] < info["first_epoch_objective"] < j0
    # measured 72 -> 20 (37 -> 10 and 35 -> 10)
    assert warm_passes <= 0.6 * cold_passes, (warm_passes, cold_passes)


def test_steps_of_several_batches_cover_each_batch_once_per_epoch(rotated):
    train, cold = rotated
    args = FitArgs(**KW, warmup_epochs=3, warmup_batches=5)
    head = fit_head(new_head(train.image, train.text, args), train.image, train.text, args)
    nb = -(-len(train) // KW["batch_size"])
    assert head.info["warmup"]["steps"] == 3 * -(-nb // 5)
    assert float((head.m - cold.m).abs().max()) < 1e-7


def test_warm_up_streams_float16_memmaps(tmp_path):
    x, y = noisy_copies(10_000, 16, seed=3)
    paths = []
    for name, a in (("x", x), ("y", y)):
        mm = np.lib.format.open_memmap(tmp_path / f"{name}.npy", "w+", np.float16, a.shape)
        mm[:] = a
        mm.flush()
        paths.append(tmp_path / f"{name}.npy")
    xm, ym = (np.load(p, mmap_mode="r") for p in paths)
    assert isinstance(xm, np.memmap) and xm.dtype == np.float16
    kw = dict(batch_size=32, optimizer="lbfgs", warmup_epochs=2, dtype="float64", tol=1e-8)
    head = ecif.fit((xm, ym), **kw)
    assert head.info["warmup"]["finite"] and head.info["grad_max"] <= 1e-8
    # the same numbers as in-memory float64 copies of the same half-precision values
    same = ecif.fit((np.asarray(xm, np.float64), np.asarray(ym, np.float64)), **kw)
    assert torch.equal(head.m, same.m)
    # and the optimum of the cold fit
    cold = ecif.fit((xm, ym), **dict(kw, warmup_epochs=0))
    assert cold.info["converged"]
    assert float((head.m - cold.m).abs().max()) < 1e-7
    assert head.info["evaluations"] < cold.info["evaluations"]


def test_auto_warm_up_only_on_large_lbfgs_fits_without_init(rotated, monkeypatch):
    train, cold = rotated
    assert wu.auto_epochs(None, "lbfgs", wu.AUTO_MIN_PAIRS, warm_start=False) == wu.AUTO_EPOCHS
    assert wu.auto_epochs(None, "lbfgs", wu.AUTO_MIN_PAIRS - 1, warm_start=False) == 0
    assert wu.auto_epochs(None, "newton", 10**7, warm_start=False) == 0
    assert wu.auto_epochs(None, "lbfgs", 10**7, warm_start=True) == 0
    assert wu.auto_epochs(3, "newton", 10, warm_start=True) == 3
    # small sets: auto is off, so the default fit is the cold one bit for bit
    assert torch.equal(ecif.fit(train, **KW).m, cold.m)
    monkeypatch.setattr(wu, "AUTO_MIN_PAIRS", 1000)
    auto = ecif.fit(train, **KW)
    steps = wu.AUTO_EPOCHS * -(-len(train) // KW["batch_size"])
    assert auto.info["warmup"]["steps"] == steps
    width = train.d_image  # square head: sqrt(d_img d_txt) = d
    assert auto.info["warmup"]["lr"] == pytest.approx(wu.AUTO_LR / np.sqrt(width * steps))
    assert float((auto.m - cold.m).abs().max()) < 1e-7
    refit = ecif.fit(train, init=cold, **KW)  # warm start: no warm-up
    assert refit.info["warmup"] is None


def test_learned_scale_warm_up_reaches_the_same_stationary_point():
    x, y, _ = synthetic_pairs(600, 4, noise=0.2, seed=2)
    train = ecif.EmbeddingSet(x, y)
    kw = dict(KW, batch_size=16, learn_scale=True, tol=1e-8)
    cold = ecif.fit(train, warmup_epochs=0, **kw)
    warm = ecif.fit(train, warmup_epochs=2, **kw)
    assert cold.info["converged"] and warm.info["converged"]
    g = torch.func.grad(Reference(warm, train.image, train.text).objective)(warm.theta())
    assert float(g.abs().max()) < 1e-7  # measured 3.4e-8
    assert float((warm.theta() - cold.theta()).abs().max()) < 1e-6  # measured 3.7e-8


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(warmup_epochs=-1), "warmup_epochs must be None"),
        (dict(warmup_epochs=1.5), "warmup_epochs must be None"),
        (dict(warmup_epochs=True), "warmup_epochs must be None"),
        (dict(warmup_epochs=1, warmup_lr=0.0), "warmup_lr must be None"),
        (dict(warmup_epochs=1, warmup_lr=float("nan")), "warmup_lr must be None"),
        (dict(warmup_epochs=1, warmup_lr=-0.1), "warmup_lr must be None"),
    ],
)
def test_bad_warm_up_values_are_refused(kw, match):
    x, y, _ = synthetic_pairs(64, 4, seed=0)
    with pytest.raises(ValueError, match=match):
        ecif.fit((x, y), batch_size=8, **kw)


def test_bad_batches_per_step_is_refused():
    x, y, _ = synthetic_pairs(64, 4, seed=0)
    args = FitArgs(batch_size=8, warmup_epochs=1, warmup_batches=0)
    with pytest.raises(ValueError, match="warmup_batches must be an integer >= 1"):
        fit_head(new_head(x, y, args), x, y, args)


def test_progress_bars_go_to_stderr(capsys):
    x, y, _ = synthetic_pairs(256, 4, seed=0)
    ecif.fit((x, y), batch_size=16, optimizer="lbfgs", warmup_epochs=1, progress=True)
    err = capsys.readouterr().err
    assert "fit warm-up" in err and "fit (L-BFGS)" in err


def test_cli_score_has_a_warmup_epochs_option():
    from ecif.cli import build_parser
    from ecif.cli.common import audit_args_from

    parser = build_parser()
    base = ["score", "emb", "-o", "out", "--device", "cpu"]
    assert audit_args_from(parser.parse_args(base)).warmup_epochs is None
    args = audit_args_from(parser.parse_args([*base, "--warmup-epochs", "3"]))
    assert args.warmup_epochs == 3
    assert (
        audit_args_from(parser.parse_args([*base, "--warmup-epochs", "auto"])).warmup_epochs is None
    )
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--warmup-epochs", "-2"])


def test_partition_is_untouched_by_the_warm_up(rotated):
    train, cold = rotated
    warm = ecif.fit(train, warmup_epochs=1, warmup_lr=0.01, **KW)
    assert warm.info["warmup"]["lr"] == 0.01
    expected = make_partition(len(train), KW["batch_size"], 0)
    assert np.array_equal(warm.partition.index, expected.index)
