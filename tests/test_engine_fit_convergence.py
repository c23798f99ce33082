"""The head fit reaches its tolerance in float32, and says so loudly when it does not (issue 13).

The float32 Newton fit used to stop at a "precision floor" of the objective's VALUE while
the gradient was still 1e-4..1e-3 (the value is quantised at ~eps |J|; the full Newton step
that would have met the tolerance could not be judged by it), and reported nothing.
"""

import warnings

import numpy as np
import pytest
import torch

import ecif
from ecif.datasets import clip_like_pairs
from tests.engine_reference import Reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _autograd_grad_max(head, x, y) -> float:
    """max |grad J| at the head's M by the independent float64 autograd objective."""
    ref = Reference(head, x, y)
    ref.head = head.with_theta(head.theta().double())
    ref.head.m0 = head.m0.double()
    return float(torch.func.grad(ref.objective)(head.theta().double()).abs().max())


def _fit_quietly(train, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ecif.ConvergenceWarning)  # a converged fit is silent
        return ecif.fit(train, **kw)


@pytest.fixture(scope="module")
def planted():
    # anisotropic CLIP-like pairs, 20% shuffled captions; CLIP's logit scale 100, lam 1e-3.
    # The old float32 fit stopped here at grad max 3.2e-3 (tol 1e-5) after 7 iterations.
    x, y, _ = clip_like_pairs(2000, 16, noise=0.2, seed=0)
    x, y = x.astype(np.float32), y.astype(np.float32)
    ref = _fit_quietly((x, y), dtype="float64", optimizer="newton")  # the reference optimum
    return x, y, ref


def test_float32_newton_fit_reaches_the_float64_optimum(planted):
    x, y, ref = planted
    assert ref.info["converged"] and _autograd_grad_max(ref, x, y) < 1e-10
    head = _fit_quietly((x, y), optimizer="newton")
    assert head.dtype == torch.float32 and head.info["optimizer"] == "newton"
    assert head.info["converged"] and head.info["stop"] == "tol"
    assert head.info["grad_max"] <= head.info["tol"] == 1e-5
    # stationary for the independent objective too, in float64 (measured 3.9e-6)
    assert _autograd_grad_max(head, x, y) <= 1e-5
    # and the float64 optimum to float32 precision: measured 6e-7 of max |M|; M's own
    # float32 rounding is 6e-8 of it, the gradient tolerance allows about 1e-5
    rel = float((head.m.double() - ref.m).abs().max() / ref.m.abs().max())
    assert rel < 1e-5, rel


def test_float32_lbfgs_fit_reaches_the_float64_optimum(planted):
    x, y, ref = planted
    head = _fit_quietly((x, y), optimizer="lbfgs")
    assert head.info["converged"] and head.info["grad_max"] <= 1e-5
    assert _autograd_grad_max(head, x, y) <= 1e-5
    rel = float((head.m.double() - ref.m).abs().max() / ref.m.abs().max())
    assert rel < 1e-5, rel


@pytest.mark.parametrize("optimizer", ["newton", "lbfgs"])
def test_a_fit_cut_short_warns_and_says_so(planted, optimizer):
    x, y, _ = planted
    with pytest.warns(ecif.ConvergenceWarning, match=r"gradient max-abs .* > tol 1e-05") as rec:
        head = ecif.fit((x, y), optimizer=optimizer, max_iter=1)
    assert "max_iter" in str(rec[0].message)  # what to try
    assert rec[0].filename == __file__  # points at the caller's ecif.fit line
    assert not head.info["converged"] and head.info["stop"] == "max_iter"
    # truthful: the gradient really is above the tolerance (independent autograd)
    assert _autograd_grad_max(head, x, y) > 1e-5


def test_an_unreachable_tolerance_stops_at_the_precision_floor_and_warns(planted):
    x, y, ref = planted
    with pytest.warns(ecif.ConvergenceWarning, match="float64") as rec:
        head = ecif.fit((x, y), optimizer="newton", tol=1e-12)  # far below float32's reach
    assert "float32 precision" in str(rec[0].message)
    assert not head.info["converged"] and head.info["stop"] == "precision"
    assert head.info["iterations"] < 30  # stops on its own, not at the iteration cap
    # the point it stopped at is the float64 optimum to float32 precision
    assert _autograd_grad_max(head, x, y) <= 1e-5
    assert float((head.m.double() - ref.m).abs().max() / ref.m.abs().max()) < 1e-5


@pytest.mark.slow
def test_issue_13_regression_converges_in_float32():
    # the reproduction from issue 13: default options, float32, damped-Newton path; it used
    # to stop after 8 iterations at grad max 7.3e-4 with converged False and no warning
    x, y, _ = clip_like_pairs(5000, 32, noise=0.2, seed=0)
    x, y = x.astype(np.float32), y.astype(np.float32)
    train = ecif.EmbeddingSet(image=x, text=y, ids=np.arange(5000))
    head = _fit_quietly(train, seed=0, optimizer="newton")  # the path that stalled
    assert head.info["optimizer"] == "newton" and head.info["converged"]
    assert _autograd_grad_max(head, x, y) <= 1e-5  # measured 2.9e-6
    default = _fit_quietly(train, seed=0)  # auto now picks L-BFGS here (fit.choose_optimizer)
    assert default.info["converged"] and _autograd_grad_max(default, x, y) <= 1e-5
