"""`ecif export`: DataComp subset files round-trip; the kept ids are exactly the right ones."""

import numpy as np
import pandas as pd
import pytest

import ecif
from ecif.audit import AuditArgs
from ecif.audit.export import (
    ExportError,
    array_to_uids,
    export_audit,
    read_subset_file,
    uids_to_array,
    write_subset_file,
)
from ecif.audit.shards import score_shards
from ecif.cli import main
from ecif.data import layout
from tests.engine_reference import synthetic_pairs


def _uids(n, seed):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("0123456789abcdef"), 32)) for _ in range(n)]


def test_subset_file_round_trips_with_datacomp_dtype(tmp_path):
    uids = _uids(50, 0) + ["0" * 32, "f" * 32, "0000000000000001" + "f" * 16]
    path = write_subset_file(
        [u.upper() if i % 7 == 0 else u for i, u in enumerate(uids)], tmp_path / "s.npy"
    )
    arr = np.load(path)
    assert arr.dtype == np.dtype("u8,u8") and arr.ndim == 1 and len(arr) == len(uids)
    # DataComp's own recipe (its README), computed independently
    ref = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    ref.sort()
    assert np.array_equal(arr, ref)
    assert array_to_uids(arr) == sorted(uids)  # fixed-width hex sorts like the integer pairs
    assert set(array_to_uids(read_subset_file(path))) == set(uids)
    np.save(tmp_path / "unsorted.npy", ref[::-1])
    with pytest.raises(ExportError, match="not sorted"):
        read_subset_file(tmp_path / "unsorted.npy")
    with pytest.raises(ExportError, match="2 of 3 uids are not 32 hex"):
        uids_to_array(["a" * 32, "a" * 31, "g" * 32])


def _emb_folder(tmp_path, id_col="uid", extra_uid=False, parts=2, rows=60, d=8):
    x, y, _ = synthetic_pairs(parts * rows, d, noise=0.2, seed=3)
    uids = _uids(parts * rows, 1)
    folder = tmp_path / "emb"
    for k in range(parts):
        sl = slice(k * rows, (k + 1) * rows)
        ids = uids[sl] if id_col == "uid" else [f"k{k}-{i}" for i in range(rows)]
        meta = pd.DataFrame({id_col: ids, "text": [f"t{k}-{i}" for i in range(rows)]})
        if extra_uid:
            meta["uid"] = uids[sl]
        meta["status"], meta["error_message"] = "ok", None
        img, txt = x[sl].copy(), y[sl].copy()
        if k == 1:
            meta.loc[3, ["status", "error_message"]] = ["failed", "cannot decode image"]
            img[3] = txt[3] = 0
        layout.write_part(folder, k, img, txt, meta, {"source": f"{k:05d}.parquet"})
    layout.write_manifest(
        folder,
        {
            "id_column": id_col,
            "parts": [{"index": k, "source": f"/in/{k:05d}.parquet"} for k in range(parts)],
        },
    )
    xv, yv, _ = synthetic_pairs(60, d, noise=0.0, seed=4)
    out = tmp_path / "audit"
    args = AuditArgs(batch_size=16, logit_scale=10.0, threshold=0.15)
    score_shards(folder, out, ecif.EmbeddingSet(xv, yv), args=args, log=lambda s: None)
    return out, uids


def test_export_drop_flagged_keeps_exactly_the_unflagged_uids(tmp_path, capsys):
    audit, uids = _emb_folder(tmp_path)
    table, _ = ecif.audit.read_audit(audit)
    ok = table["status"] == "ok"
    want = set(table.loc[ok & ~table["is_misaligned"], "id"])
    assert table["is_misaligned"].sum() == 18 and len(want) == 119 - 18
    assert table.loc[~ok, "id"].iloc[0] == uids[63]  # the failed row: never kept

    out = tmp_path / "subset.npy"
    assert (
        main(["export", str(audit), "--drop-flagged", "--format", "datacomp", "-o", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "kept 101 of 120 rows; dropped 18 flagged, 1 failed" in text
    assert set(array_to_uids(read_subset_file(out))) == want

    ids_out = tmp_path / "kept.parquet"
    assert (
        main(["export", str(audit), "--drop-flagged", "--format", "ids", "-o", str(ids_out)]) == 0
    )
    kept = pd.read_parquet(ids_out)
    assert list(kept.columns) == ["uid"] and set(kept["uid"]) == want and len(kept) == len(want)


def test_export_keep_fraction_keeps_the_least_suspicious(tmp_path):
    audit, _ = _emb_folder(tmp_path)
    table, _ = ecif.audit.read_audit(audit)
    res = export_audit(audit, tmp_path / "k.csv", keep=0.3, fmt="ids")
    assert res.kept == round(0.3 * 119) == 36 and res.dropped == 119 - 36 and res.failed == 1
    kept = set(pd.read_csv(tmp_path / "k.csv")["uid"])
    scores = table.set_index("id")["misalign_score"]
    scored = scores.dropna()
    assert scored[list(kept)].max() <= scored.drop(list(kept)).min()


def test_export_finds_uids_in_the_embedding_metadata(tmp_path):
    audit, uids = _emb_folder(tmp_path, id_col="key", extra_uid=True)
    table, _ = ecif.audit.read_audit(audit)
    res = export_audit(audit, tmp_path / "s.npy", drop_flagged=True)
    kept_keys = table.loc[(table["status"] == "ok") & ~table["is_misaligned"], "id"]
    key_to_uid = {f"k{k}-{i}": uids[k * 60 + i] for k in range(2) for i in range(60)}
    assert set(array_to_uids(np.load(tmp_path / "s.npy"))) == {key_to_uid[k] for k in kept_keys}
    assert res.written == len(kept_keys)


def test_export_errors_are_one_line(tmp_path, capsys):
    audit, _ = _emb_folder(tmp_path, id_col="key")
    out = str(tmp_path / "s.npy")
    assert main(["export", str(audit), "--drop-flagged", "-o", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "id column 'key'" in err and "101 of 101 kept rows" in err
    assert main(["export", str(tmp_path / "nope"), "--keep", "0.5", "-o", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no such folder" in err
    assert main(["export", str(audit), "--keep", "0.5", "--format", "ids", "-o", out]) == 2
    assert ".csv or .parquet" in capsys.readouterr().err
    for bad in ("0", "1.5", "half"):
        with pytest.raises(SystemExit) as e:
            main(["export", str(audit), "--keep", bad, "-o", out])
        assert e.value.code == 2
        assert "fraction in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ExportError, match="exactly one"):
        export_audit(audit, out, keep=0.5, drop_flagged=True)
