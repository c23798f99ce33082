"""Shard-by-shard scoring equals scoring the concatenated set; reruns skip; failed rows kept."""

import numpy as np
import pandas as pd
import pytest

import ecif
from ecif.audit import AuditArgs
from ecif.audit.shards import score_shards
from ecif.data import layout
from tests.engine_reference import synthetic_pairs


def _folder(tmp_path, parts=3, rows=60, d=8):
    x, y, bad = synthetic_pairs(parts * rows, d, noise=0.2, seed=11)
    folder = tmp_path / "emb"
    for k in range(parts):
        sl = slice(k * rows, (k + 1) * rows)
        meta = pd.DataFrame(
            {
                "key": [f"p{k}-{i}" for i in range(rows)],
                "caption": [f"caption {k}-{i}" for i in range(rows)],
                "status": "ok",
                "error_message": None,
            }
        )
        img, txt = x[sl].copy(), y[sl].copy()
        if k == 1:  # one row that failed to embed: kept, zero embeddings, status failed
            meta.loc[7, ["status", "error_message"]] = ["failed", "cannot decode image"]
            img[7] = 0
            txt[7] = 0
        layout.write_part(folder, k, img, txt, meta, {"source": f"{k:05d}.parquet"})
    layout.write_manifest(
        folder,
        {
            "id_column": "key",
            "parts": [{"index": k, "source": f"/in/{k:05d}.parquet"} for k in range(parts)],
        },
    )
    xv, yv, _ = synthetic_pairs(80, d, noise=0.0, seed=12)
    return folder, ecif.EmbeddingSet(xv, yv)


def test_shards_equal_concatenated_and_rerun_skips(tmp_path):
    folder, val = _folder(tmp_path)
    args = AuditArgs(batch_size=16, logit_scale=10.0, lam=1e-3, threshold=0.1)
    out = tmp_path / "audit"
    summary = score_shards(folder, out, val, args=args, log=lambda s: None)
    assert summary["ok"].sum() == 179 and summary["failed"].sum() == 1
    files = sorted((out / "scores").glob("*.parquet"))
    assert [f.name for f in files] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    shard_scores = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    # the concatenated set, scored in one pass with the same shard-local partition
    train = ecif.EmbeddingSet.load(folder)
    groups = np.repeat([0, 1, 2], [60, 59, 60])
    head = ecif.fit(train, batch_size=16, logit_scale=10.0, groups=groups)
    ref = ecif.score(head, train, val)
    ok = shard_scores[shard_scores["status"] == "ok"].reset_index(drop=True)
    assert list(ok["id"]) == list(train.ids)
    assert np.allclose(ok["influence"], ref["influence"], rtol=1e-4, atol=1e-7)
    failed = shard_scores[shard_scores["status"] == "failed"]
    assert len(failed) == 1 and failed["error_message"].iloc[0] == "cannot decode image"
    assert failed["influence"].isna().all() and not failed["is_misaligned"].any()
    assert ok["is_misaligned"].sum() == 18  # 10% of the scored rows
    assert set(ok.loc[ok["is_misaligned"], "rank"]) == set(range(1, 19))

    before = {f.name: f.stat().st_mtime_ns for f in files}
    again = score_shards(folder, out, val, args=args, log=lambda s: None)
    assert again["skipped"].sum() == 3
    pd.testing.assert_frame_equal(
        pd.concat([pd.read_parquet(f) for f in files], ignore_index=True), shard_scores
    )
    assert before.keys() == {f.name for f in files}
    table, info = ecif.audit.read_audit(out)
    assert len(table) == 180 and info["embeddings"].endswith("emb")


def test_in_memory_audit_of_a_loaded_folder_equals_the_scored_shards(tmp_path):
    """``EmbeddingSet.load`` records each row's part, so the Auditor batches inside parts as
    ``score_shards`` does (before, its batches crossed parts and pair_loss differed by up
    to 1.8 on this folder)."""
    folder, val = _folder(tmp_path, rows=120, d=16)
    args = AuditArgs(batch_size=16)
    score_shards(folder, tmp_path / "audit", val, args=args, log=lambda s: None)
    files = sorted((tmp_path / "audit" / "scores").glob("*.parquet"))
    shards = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    shards = shards[shards["status"] == "ok"].reset_index(drop=True)

    loaded = ecif.EmbeddingSet.load(folder)
    assert list(loaded.metadata["part"]) == [0] * 120 + [1] * 119 + [2] * 120
    memory = ecif.Auditor(loaded, val, args).run()
    assert list(memory["id"]) == list(shards["id"])
    for col in ("pair_loss", "trusted_loss", "knn_disagreement", "influence", "misalign_score"):
        np.testing.assert_allclose(memory[col], shards[col], rtol=1e-4, atol=1e-4, err_msg=col)

    # the part column is the layout's, not data: saving drops it and loading re-derives it
    again = ecif.EmbeddingSet.load(loaded.save(tmp_path / "resaved", part_rows=200))
    assert list(again.metadata["part"]) == [0] * 200 + [1] * 159


def test_audit_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not an audit folder"):
        ecif.audit.read_audit(tmp_path)
    with pytest.raises(ValueError, match="not an embedding folder"):
        score_shards(tmp_path, tmp_path / "out", None, log=lambda s: None)


def test_cli_score_verify_clean_round_trip(tmp_path, capsys):
    from ecif.cli import main

    folder, val = _folder(tmp_path)
    val.save(tmp_path / "val")
    out = tmp_path / "audit"
    common = ["--batch-size", "16", "--logit-scale", "10", "--quiet"]
    assert (
        main(
            [
                "score",
                str(folder),
                "--val",
                str(tmp_path / "val"),
                "-o",
                str(out),
                "--threshold",
                "20",
                *common,
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "scored: ok=179 failed=1" in text and "flagged 20" in text
    table, info = ecif.audit.read_audit(out)
    assert table["is_misaligned"].sum() == 20 and info["model"] is None
    assert main(["verify", str(out), "--val", str(tmp_path / "val"), "-k", "6", "--quiet"]) == 0
    assert "Spearman(predicted, actual)" in capsys.readouterr().out
    keep = tmp_path / "keep.csv"
    assert (
        main(
            [
                "clean",
                str(out),
                "--val",
                str(tmp_path / "val"),
                "--keep-output",
                str(keep),
                "--quiet",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "drop ecif" in text and "drop random" in text and "one-step" in text
    assert len(pd.read_csv(keep)) == 179 - 20


def test_cli_help_for_every_verb(capsys):
    from ecif.cli import VERB_MODULES, main

    for verb in VERB_MODULES:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert "usage: ecif" in capsys.readouterr().out
