"""The options objects: one default per option, help on every field, the old names still
working (with a DeprecationWarning) for one release, and one meaning of device "auto"."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import numpy as np
import pytest
import torch

import ecif
from ecif.audit.auditor import AuditArgs
from ecif.audit.demo import DemoArgs
from ecif.audit.retrain import RetrainConfig
from ecif.audit.selection import SelectArgs
from ecif.audit.trace import TraceBack
from ecif.audit.trace_args import TraceArgs
from ecif.device import DEFAULT_DEVICE, DeviceError, resolve_device
from ecif.engine.fit import FitArgs
from ecif.engine.inverse_hessian import METHODS, SOLVERS, InverseHessian, SolverArgs
from ecif.engine.model_mode import ModelArgs
from ecif.options import default_of, source_of
from tests.engine_reference import synthetic_pairs

OPTIONS = (
    FitArgs,
    SolverArgs,
    AuditArgs,
    SelectArgs,
    TraceArgs,
    DemoArgs,
    RetrainConfig,
    ModelArgs,
)

# the same name in two options classes for two different things (so two defaults), and why
DIFFERENT = {
    ("AuditArgs", "lam"): "the audit chooses the pull ('auto') where a plain fit takes 1e-3",
    ("AuditArgs", "logit_scale"): "the audit calibrates the scale ('auto')",
    ("SelectArgs", "lam"): "the pull an audit's 'auto' takes",
    ("SolverArgs", "seed"): "seeds the batch subsamples of H, not the partition",
    ("SolverArgs", "tol"): "CG's residual, not the fit's gradient tolerance",
    ("SolverArgs", "max_iter"): "CG iterations, not the fit's",
    ("RetrainConfig", "batch_size"): "a CLIP's training batch, not the head's partition",
    ("RetrainConfig", "seed"): "seeds the retraining run",
    ("RetrainConfig", "device"): "where a CLIP is retrained: cpu by default, to repeat bit for bit",
    ("DemoArgs", "output"): "a folder, in no other stage",
    ("ModelArgs", "params"): "which model mode to fit; the audit's params also offers head",
    ("ModelArgs", "lam"): "the pull on the encoders' part (None: per mode, model_mode.pull_of)",
    ("ModelArgs", "logit_scale"): "a fixed temperature for the model modes (None: the model's)",
}


def test_every_option_has_help():
    for cls in OPTIONS:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_each_default_lives_in_one_place():
    """A name shared by two options classes is borrowed from one of them, or is listed in
    DIFFERENT as another option under the same name."""
    owners: dict[str, set[tuple[str, str]]] = {}
    for cls in OPTIONS:
        for f in dataclasses.fields(cls):
            home, name = source_of(cls, f.name)
            owners.setdefault(f.name, set()).add((home.__name__, name))
    for name, homes in owners.items():
        homes = {h for h in homes if h not in DIFFERENT}
        assert len(homes) <= 1, f"{name!r} has defaults in {sorted(homes)}"


def test_audit_args_compose_the_fit_and_solve_options():
    assert source_of(AuditArgs, "batch_size") == (FitArgs, "batch_size")
    assert source_of(AuditArgs, "solver") == (SolverArgs, "solver")
    assert source_of(TraceArgs, "neg") == (AuditArgs, "neg")
    a = AuditArgs(batch_size=32, seed=3, dtype="float64", warmup_epochs=0, solver="cg")
    fit = a.fit_args(lam=0.5, logit_scale=10.0)
    assert (fit.batch_size, fit.seed, fit.dtype, fit.warmup_epochs) == (32, 3, "float64", 0)
    assert (fit.lam, fit.logit_scale, fit.max_iter) == (0.5, 10.0, default_of(FitArgs, "max_iter"))
    assert a.solver_args() == SolverArgs(solver="cg")
    assert AuditArgs().fit_args() == FitArgs()  # no default of its own


def test_ecif_fit_takes_fit_args_or_its_fields_and_nothing_else():
    x, y, _ = synthetic_pairs(40, 4, noise=0.25, seed=1)
    kw = dict(batch_size=8, lam=1e-2, logit_scale=8.0, dtype="float64")
    a = ecif.fit((x, y), **kw)
    b = ecif.fit((x, y), FitArgs(**kw))
    c = ecif.fit((x, y), FitArgs(batch_size=8), lam=1e-2, logit_scale=8.0, dtype="float64")
    assert torch.equal(a.m, b.m) and torch.equal(a.m, c.m)
    with pytest.raises(TypeError, match="unexpected keyword.*'bacth_size'"):
        ecif.fit((x, y), bacth_size=8)


def test_device_auto_is_the_cpu_here_and_computes_the_same():
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine auto is cuda")
    assert resolve_device("auto") == "cpu" and resolve_device() == "cpu"
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda:0")
    x, y, _ = synthetic_pairs(40, 4, noise=0.25, seed=1)
    auto = ecif.fit((x, y), batch_size=8, logit_scale=8.0)
    cpu = ecif.fit((x, y), batch_size=8, logit_scale=8.0, device="cpu")
    assert auto.m.device.type == "cpu" and torch.equal(auto.m, cpu.m)
    assert AuditArgs().record()["device"] == "cpu"  # what computed, as before


def test_every_device_default_is_auto():
    from ecif.data.index import VectorIndex, load_indexes
    from ecif.data.models import load_model

    fns = (ecif.embed, load_model, VectorIndex.build, VectorIndex.load, load_indexes)
    for fn in fns:
        assert inspect.signature(fn).parameters["device"].default == DEFAULT_DEVICE, fn
    for cls in (FitArgs, AuditArgs, TraceArgs):
        assert default_of(cls, "device") == DEFAULT_DEVICE, cls
    from ecif.cli import common
    from ecif.data import models

    assert models.resolve_device is resolve_device  # one resolve_device
    assert getattr(common, "resolve_device", resolve_device) is resolve_device


def test_old_names_still_work_and_warn():
    x, y, _ = synthetic_pairs(40, 4, noise=0.25, seed=1)
    kw = dict(batch_size=8, logit_scale=8.0, dtype="float64")
    with pytest.warns(DeprecationWarning, match=r"ecif.fit\(solver=...\).*optimizer=") as rec:
        head = ecif.fit((x, y), solver="newton", **kw)
    assert rec[0].filename == __file__  # points at the caller
    assert head.info["optimizer"] == "newton" == head.info["solver"]  # old key, one release
    assert torch.equal(head.m, ecif.fit((x, y), optimizer="newton", **kw).m)
    with pytest.warns(DeprecationWarning, match=r"FitArgs\(solver=...\)"):
        assert FitArgs(solver="lbfgs").optimizer == "lbfgs"
    with pytest.warns(DeprecationWarning, match="FitArgs.solver"):
        assert FitArgs(optimizer="newton").solver == "newton"
    with pytest.warns(DeprecationWarning, match=r"SolverArgs\(method=...\).*solver="):
        assert SolverArgs(method="cg") == SolverArgs(solver="cg")
    with pytest.warns(DeprecationWarning, match=r"AuditArgs\(method=...\)"):
        assert AuditArgs(method="ekfac").solver == "ekfac"
    with pytest.warns(DeprecationWarning, match="AuditArgs.method"):
        assert AuditArgs(solver="cg").method == "cg"
    with pytest.warns(DeprecationWarning, match=r"ecif.api.solver\(method=...\)"):
        assert ecif.solver(head, (x, y), method="exact").method == "exact"
    g = ecif.loss_gradient(head, (x, y))
    with pytest.warns(DeprecationWarning, match=r"ecif.api.score\(method=...\)"):
        old = ecif.score(head, (x, y), query_grad=g, method="exact")
    new = ecif.score(head, (x, y), query_grad=g, solver="exact")
    assert np.array_equal(old["influence"], new["influence"])
    assert METHODS == SOLVERS
    with pytest.raises(TypeError, match="give solver= only"):
        SolverArgs(method="cg", solver="exact")


def test_trace_back_options_moved_into_trace_args_still_work():
    x, y, _ = synthetic_pairs(40, 4, noise=0.25, seed=1)
    train = ecif.EmbeddingSet(x, y)
    head = ecif.fit(train, batch_size=8, logit_scale=8.0, dtype="float64")
    with pytest.warns(DeprecationWarning) as rec:
        tb = TraceBack(head, train, method="exact", context_top=8, query_threads=None)
    said = [str(r.message) for r in rec]
    assert len(said) == 3 and "TraceBack(method=...)" in said[0]
    assert "use args=TraceArgs(solver=...)" in said[0]
    assert tb.args == TraceArgs(solver="exact", context_top=8, query_threads=None)
    with pytest.warns(DeprecationWarning, match="TraceBack.refine"):
        tb.refine = 5
    assert tb.args.refine == 5
    from ecif.audit.trace_cache import trace_solver

    with pytest.warns(DeprecationWarning, match=r"trace_solver\(method=...\)"):
        assert trace_solver(head, x, y, method="ekfac").method == "ekfac"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling is quiet
        assert TraceBack(head, train, args=TraceArgs(solver="exact")).inverse.method == "exact"


def test_saved_solver_state_of_either_name_loads():
    """trace.pt written before the rename holds SolverArgs as {"method": ...}."""
    x, y, _ = synthetic_pairs(40, 4, noise=0.25, seed=1)
    head = ecif.fit((x, y), batch_size=8, logit_scale=8.0, dtype="float64")
    inv = ecif.solver(head, (x, y), solver="ekfac")
    state = inv.ekfac_state()
    old = dict(
        state, args={("method" if k == "solver" else k): v for k, v in state["args"].items()}
    )
    g = torch.randn(head.num_params, dtype=torch.float64)
    for s in (state, old):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = InverseHessian.from_ekfac_state(head, x, y, s)
        assert loaded.args.solver == "ekfac" and torch.allclose(loaded.solve(g), inv.solve(g))


def test_recorded_options_of_older_audits_read_and_reuse():
    from ecif.audit.reruns import reusable as _reusable

    old = {"batch_size": 16, "method": "cg", "lam": "auto", "device": "cpu"}
    args = AuditArgs.from_record(old)
    assert args.solver == "cg" and args.batch_size == 16
    new = dict(old, solver=old.pop("method"))
    meta = {"source": "s", "options": new}
    assert _reusable({"source": "s", "options": dict(old, method="cg")}, "s", meta)
    assert not _reusable({"source": "s", "options": dict(old, method="exact")}, "s", meta)
