"""What an audit records about itself: one id column name, both embedding folders, one truth
about the threshold, the validation source, the fit's convergence; and how `ecif score`
reports (summary last, progress on stderr, no prints from library code)."""

import json
import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

import ecif
from ecif.audit import AuditArgs
from ecif.audit.folder import read_heads, read_parquet_meta
from ecif.audit.shards import score_shards
from ecif.cli import main
from tests.test_audit_shards import _folder

FAST = ["--batch-size", "16", "--logit-scale", "10", "--quiet"]


def test_one_id_column_and_both_folders_recorded(tmp_path):
    folder, val = _folder(tmp_path)
    val.save(tmp_path / "val")
    val = ecif.EmbeddingSet.load(tmp_path / "val")
    out = tmp_path / "audit"
    score_shards(folder, out, val, args=AuditArgs(batch_size=16, logit_scale=10.0))
    info = json.loads((out / "audit.json").read_text())
    assert info["embeddings"] == str(folder.resolve())
    assert info["validation_embeddings"] == str((tmp_path / "val").resolve())
    assert info["id_column"] == "id" and info["source_id_column"] == "key"
    for f in sorted((out / "scores").glob("*.parquet")):
        names = pq.read_schema(f).names
        assert names[0] == "id" and "key" not in names
        assert read_parquet_meta(f)["source_id_column"] == "key"
    table, _ = ecif.audit.read_audit(out)
    meta = pd.concat(pd.read_parquet(p) for p in sorted((folder / "metadata").glob("*.parquet")))
    assert table["id"].tolist() == meta["key"].tolist()


def test_older_audits_with_a_key_column_still_read(tmp_path):
    folder, val = _folder(tmp_path)
    out = tmp_path / "audit"
    score_shards(folder, out, val, args=AuditArgs(batch_size=16, logit_scale=10.0))
    for f in (out / "scores").glob("*.parquet"):  # as ecif 0.1 wrote them
        pd.read_parquet(f).rename(columns={"id": "key"}).to_parquet(f)
    info = json.loads((out / "audit.json").read_text())
    info["id_column"] = "key"
    del info["source_id_column"]
    (out / "audit.json").write_text(json.dumps(info))
    table, _ = ecif.audit.read_audit(out)
    assert "id" in table and table["id"].str.startswith("p").all()


def test_rerun_with_another_threshold_keeps_one_truth(tmp_path, capsys):
    folder, val = _folder(tmp_path)
    val.save(tmp_path / "val")
    out = tmp_path / "audit"
    base = ["score", str(folder), "--val", str(tmp_path / "val"), "-o", str(out), *FAST]
    assert main([*base, "--threshold", "20"]) == 0
    assert main([*base, "--threshold", "0.05"]) == 0
    capsys.readouterr()
    info = json.loads((out / "audit.json").read_text())
    assert info["options"]["threshold"] == "0.05" and info["threshold"] == "fraction 0.05"
    table, _ = ecif.audit.read_audit(out)
    assert table["is_misaligned"].sum() == round(0.05 * 179) == info["flagged"]
    for f in (out / "scores").glob("*.parquet"):
        meta = read_parquet_meta(f)
        assert meta["options"]["threshold"] == "0.05" and meta["threshold"] == "fraction 0.05"
        assert meta["flagged"] == info["flagged"]


def test_rerun_with_other_score_options_rescores(tmp_path):
    folder, val = _folder(tmp_path)
    out = tmp_path / "audit"
    first = score_shards(folder, out, val, args=AuditArgs(batch_size=16, logit_scale=10.0))
    assert first["skipped"].sum() == 0
    again = score_shards(folder, out, val, args=AuditArgs(batch_size=16, logit_scale=10.0))
    assert again["skipped"].sum() == 3
    other = score_shards(folder, out, val, args=AuditArgs(batch_size=16, lam=1e-2))
    assert other["skipped"].sum() == 0  # another lam: the old scores are not this audit's
    for f in (out / "scores").glob("*.parquet"):
        assert read_parquet_meta(f)["options"]["lam"] == 1e-2


def test_no_validation_records_its_source(tmp_path, capsys):
    folder, _ = _folder(tmp_path, d=6)
    out = tmp_path / "audit"
    assert main(["score", str(folder), "-o", str(out), *FAST]) == 0
    info = json.loads((out / "audit.json").read_text())
    assert info["validation"].startswith("self-influence")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "self-influence" in last and "see audit.json" not in last


def test_score_ends_with_its_summary_and_library_code_does_not_print(tmp_path, capsys, caplog):
    folder, val = _folder(tmp_path)
    val.save(tmp_path / "val")
    out = tmp_path / "audit"
    with caplog.at_level(logging.INFO, logger="ecif.audit.shards"):
        score_shards(folder, tmp_path / "lib", val, args=AuditArgs(batch_size=16))
    assert capsys.readouterr().out == ""
    assert any(r.getMessage().startswith("scored: ok=179") for r in caplog.records)
    assert main(["score", str(folder), "--val", str(tmp_path / "val"), "-o", str(out), *FAST]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("scored: ok=179 failed=1")
    assert "validation set (80 pairs)" in lines[-1] and "flagged" in lines[-1]
    assert lines[0].split()[:2] == ["id", "caption"]  # the table first


def test_fit_and_solve_show_what_they_are_doing(tmp_path, capsys):
    folder, val = _folder(tmp_path)
    score_shards(folder, tmp_path / "out", val, args=AuditArgs(batch_size=16), progress=True)
    err = capsys.readouterr().err
    assert "fitting the head on 179 pairs: done in" in err
    assert "solving w = H^-1 g_val" in err


def test_a_head_that_did_not_converge_is_reported(tmp_path, capsys, monkeypatch):
    from ecif.audit.auditor import Auditor

    real = Auditor.fit_head

    def unconverged(self, data, **kw):
        head = real(self, data, **kw)
        head.info.update(converged=False, grad_max=3e-2, tol=1e-5)
        return head

    monkeypatch.setattr(Auditor, "fit_head", unconverged)
    folder, val = _folder(tmp_path)
    val.save(tmp_path / "val")
    out = tmp_path / "audit"
    assert main(["score", str(folder), "--val", str(tmp_path / "val"), "-o", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert "warning: the head's fit did not converge (largest gradient 3.00e-02" in err
    assert json.loads((out / "audit.json").read_text())["fit"][0]["converged"] is False


def test_embedding_set_logit_scale_is_said_and_can_be_passed():
    g = np.random.default_rng(0)
    x, y = g.standard_normal((40, 4)), g.standard_normal((40, 4))
    assert ecif.EmbeddingSet(x, y).logit_scale is None
    assert "100" in ecif.EmbeddingSet.__doc__ and "logit_scale=" in ecif.EmbeddingSet.__doc__
    es = ecif.EmbeddingSet(x, y, logit_scale=30.0)
    assert abs(ecif.fit(es, batch_size=8).logit_scale - 30.0) < 1e-9
    assert es.subset([0, 1]).logit_scale == 30.0
    assert abs(ecif.fit(ecif.EmbeddingSet(x, y), batch_size=8).logit_scale - 100.0) < 1e-9


def test_rerun_of_finished_shards_fits_nothing_and_equals_a_fresh_run(tmp_path, monkeypatch):
    """Only the threshold changes: the head, w and the twin audit of the first run are kept,
    and the tables equal those of a fresh run with the new threshold."""
    import ecif.audit.shards as shards
    from ecif.audit.auditor import Auditor

    folder, val = _folder(tmp_path, rows=120)  # 359 usable pairs: the twin audit runs
    args = AuditArgs(batch_size=16)
    out, fresh = tmp_path / "audit", tmp_path / "fresh"
    score_shards(folder, out, val, args=args, log=lambda s: None)
    first = json.loads((out / "audit.json").read_text())
    assert "probe_weights" in first["combination"]
    other = AuditArgs(batch_size=16, threshold=0.2)
    score_shards(folder, fresh, val, args=other, log=lambda s: None)

    def refuse(*a, **k):
        raise AssertionError("a rerun of finished shards fitted again")

    monkeypatch.setattr(Auditor, "fit_head", refuse)
    monkeypatch.setattr(shards, "probe_signals", refuse)
    lines = []
    again = score_shards(folder, out, val, args=other, log=lines.append)
    assert again["skipped"].sum() == 3
    assert any("only the threshold is applied again" in line for line in lines)
    table, info = ecif.audit.read_audit(out)
    ref, ref_info = ecif.audit.read_audit(fresh)
    cols = ["id", "misalign_score", "is_misaligned", "rank", "influence", "pair_loss"]
    pd.testing.assert_frame_equal(table[cols], ref[cols])
    assert table["is_misaligned"].sum() == round(0.2 * 359) == info["flagged"]
    assert info["combination"] == ref_info["combination"] == first["combination"]
    assert info["threshold"] == ref_info["threshold"] and info["n_norm"] == ref_info["n_norm"]
    assert len(read_heads(out)) == 1
