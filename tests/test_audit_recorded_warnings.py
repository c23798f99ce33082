"""The engine's warnings (a fit short of its tolerance, an approximate solve) are recorded
beside an audit's results (table.attrs, audit.json, every shard, the CLI summary, the app)
instead of being printed once and lost."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import ecif
from ecif.atomic import read_parquet_meta
from ecif.audit.recorded import audit_notes, recording_warnings
from ecif.cli import main
from ecif.data import layout
from ecif.engine.warning_types import ConvergenceWarning, UnreliableInfluenceWarning
from tests.engine_reference import synthetic_pairs
from tests.test_audit_shards import _folder


def test_recording_keeps_the_engines_warnings_once_and_warns_them_again():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with recording_warnings(prefix="pre: ") as found:
            for _ in range(3):  # the same text, three times: one note
                warnings.warn("fit A", ConvergenceWarning, stacklevel=1)
            warnings.warn("solve B", UnreliableInfluenceWarning, stacklevel=1)
            warnings.warn("not ours", DeprecationWarning, stacklevel=1)
    assert found == ["pre: fit A", "pre: solve B"]
    texts = sorted((w.category.__name__, str(w.message)) for w in seen)
    assert texts == [
        ("ConvergenceWarning", "pre: fit A"),
        ("DeprecationWarning", "not ours"),  # passed on, not recorded
        ("UnreliableInfluenceWarning", "pre: solve B"),
    ]
    with warnings.catch_warnings():  # a caller's "error" filter still sees them
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning, match="fit A"):
            with recording_warnings():
                warnings.warn("fit A", ConvergenceWarning, stacklevel=1)
    with pytest.warns(ConvergenceWarning, match="before the error"):  # a failing block
        with pytest.raises(KeyError):
            with recording_warnings():
                warnings.warn("before the error", ConvergenceWarning, stacklevel=1)
                raise KeyError("x")


def test_cg_short_of_its_tolerance_warns():
    """One CG iteration cannot reach 1e-4 on a curved head: the residual it reports is checked
    against H w - g computed from the dense Hessian, and the shortfall is a warning."""
    from ecif.engine.inverse_hessian import InverseHessian, SolverArgs

    x, y, _ = synthetic_pairs(200, 8, noise=0.2, seed=3)
    head = ecif.fit(ecif.EmbeddingSet(x, y), logit_scale=20.0, lam=1e-3, batch_size=50)
    g = torch.as_tensor(np.random.default_rng(0).standard_normal(head.num_params))
    g = g.to(head.theta().dtype)
    with pytest.warns(UnreliableInfluenceWarning, match="CG stopped after 1 iterations"):
        inv = InverseHessian(head, x, y, SolverArgs(solver="cg", max_iter=1))
        w = inv.solve(g)
    dense = inv.dense().double()
    rel = float((dense @ w.double() - g.double()).norm() / g.double().norm())
    assert rel > 1e-4 and inv.info["cg_converged"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreliableInfluenceWarning)  # converged: silent
        inv = InverseHessian(head, x, y, SolverArgs(solver="cg"))
        w = inv.solve(g)
    assert float((dense @ w.double() - g.double()).norm() / g.double().norm()) < 1e-3


def _saturated_folder(tmp_path, n=120):
    """Unit rows at logit scale 10,000 (the logits of rows of norm 10 at scale 100): float32
    cannot bring the head's gradient to its tolerance (measured: 6e-5 against 1e-5), so the
    fit warns."""
    g = np.random.default_rng(0)
    x = g.standard_normal((n, 8)).astype(np.float32)
    y = x + 0.5 * g.standard_normal((n, 8)).astype(np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    folder = tmp_path / "emb"
    for k in range(2):
        rows = slice(k * n // 2, (k + 1) * n // 2)
        meta = pd.DataFrame({"key": [f"p{i}" for i in range(n)][rows], "status": "ok"})
        meta["error_message"] = None
        layout.write_part(folder, k, x[rows], y[rows], meta, {"source": f"{k:05d}.parquet"})
    parts = [{"index": k, "source": f"/in/{k:05d}.parquet"} for k in range(2)]
    layout.write_manifest(folder, {"id_column": "key", "parts": parts})
    return folder, x, y


def test_a_fit_that_did_not_converge_is_recorded_everywhere(tmp_path, capsys):
    folder, x, y = _saturated_folder(tmp_path)
    with pytest.warns(ConvergenceWarning):  # the engine alone: this fit does stall
        ecif.fit(ecif.EmbeddingSet(x, y), logit_scale=1e4, lam=1e-2)
    out = tmp_path / "audit"
    assert main(["score", str(folder), "-o", str(out), "--logit-scale", "10000", "--quiet"]) == 0
    err = capsys.readouterr().err
    info = json.loads((out / "audit.json").read_text())
    fit = info["fit"][0]
    assert fit["converged"] is False
    (said,) = [n for n in info["warnings"] if "did not converge" in n]
    assert f"gradient max-abs {fit['grad_max']:.2e} > tol" in said
    assert err.count(f"warning: {said}\n") == 1
    assert "ConvergenceWarning" not in err  # the summary's line, not Python's
    for f in sorted((out / "scores").glob("*.parquet")):
        assert said in read_parquet_meta(f)["warnings"]
    assert audit_notes(info) == [said]
    with pytest.warns(ConvergenceWarning) as raised:  # the Python API: the table says it too
        table = ecif.Auditor(ecif.EmbeddingSet(x, y), args=ecif.AuditArgs(logit_scale=1e4)).run()
    engine = [str(w.message) for w in raised if w.category is ConvergenceWarning]
    assert engine and all(note in table.attrs["warnings"] for note in engine)


def test_audits_written_before_still_say_a_fit_did_not_converge(tmp_path):
    """audit.json files from before the engine's warnings were recorded: the fit's record."""
    old = {"warnings": [], "fit": [{"converged": False, "grad_max": 3e-2, "tol": 1e-5}] * 2}
    notes = audit_notes(old)
    assert notes == [
        "the head's fit did not converge (largest gradient 3.00e-02, tolerance "
        "1e-05): scores may be off; see 'fit' in audit.json (more iterations, a "
        "larger --lam or float64 help)"
    ]
    assert audit_notes({"fit": [{"converged": True}]}) == []
    folder, val = _folder(tmp_path)  # a converged audit records no engine warning
    out = tmp_path / "audit"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        warnings.simplefilter("error", UnreliableInfluenceWarning)
        ecif.score_shards(folder, out, val, args=ecif.AuditArgs(batch_size=16, logit_scale=10.0))
    assert json.loads((out / "audit.json").read_text()).get("warnings", []) == []
