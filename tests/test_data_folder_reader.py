"""One reader of embedding folders: ``EmbeddingSet.load`` and ``ecif score`` keep the same rows
(status ``ok`` or ``success``) and take ids from the same column; part metadata written in
the older plain-string encoding still reads."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ecif
from ecif.atomic import read_parquet_meta
from ecif.audit import AuditArgs
from ecif.audit.shards import list_embedding_parts, load_training_set, score_shards
from ecif.data import layout
from ecif.data.folder_reader import folder_id_column, read_folder
from ecif.data.layout import FolderError
from tests.engine_reference import synthetic_pairs

ARGS = AuditArgs(batch_size=16, logit_scale=10.0, lam=1e-3, threshold=0.1)


def _clip_retrieval_folder(root, columns, parts=2, rows=40, d=8, failed=(3,)):
    """A folder as clip-retrieval writes it from img2dataset output: no manifest, status
    ``success`` (one ``failed`` row per part, zero embeddings), the given id columns."""
    x, y, _ = synthetic_pairs(parts * rows, d, noise=0.2, seed=5)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k in range(parts):
        sl = slice(k * rows, (k + 1) * rows)
        img, txt = x[sl].astype(np.float16), y[sl].astype(np.float16)
        meta = pd.DataFrame({"caption": [f"caption {k}-{i}" for i in range(rows)]})
        for col, make in columns.items():
            meta[col] = [make(k, i) for i in range(rows)]
        meta["status"] = "success"
        meta.loc[list(failed), "status"] = "failed_to_download"
        img[list(failed)] = 0
        txt[list(failed)] = 0
        np.save(root / "img_emb" / f"img_emb_{k}.npy", img)
        np.save(root / "text_emb" / f"text_emb_{k}.npy", txt)
        meta.to_parquet(root / "metadata" / f"metadata_{k}.parquet")
    xv, yv, _ = synthetic_pairs(80, d, noise=0.0, seed=6)
    return root, ecif.EmbeddingSet(xv, yv)


def _scores(out):
    files = sorted((out / "scores").glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def test_success_rows_are_scored_and_ids_come_from_the_searched_column(tmp_path):
    """A clip-retrieval folder whose rows say "success" loads and scores its rows, and its
    ids come from the first unique id column (here ``uid``; no ``key``), in both readers."""
    uid = lambda k, i: f"{k:02d}{i:030x}"  # noqa: E731
    folder, val = _clip_retrieval_folder(tmp_path / "emb", {"uid": uid})
    loaded = ecif.EmbeddingSet.load(folder)
    assert len(loaded) == 78 and loaded.ids[0] == uid(0, 0)

    out = tmp_path / "audit"
    summary = score_shards(folder, out, val, args=ARGS, log=lambda s: None)
    assert summary["ok"].sum() == 78 and summary["failed"].sum() == 2
    table = _scores(out)
    scored = table[table["status"] == "ok"]
    assert len(scored) == 78 and np.isfinite(scored["influence"]).all()
    assert list(scored["id"]) == list(loaded.ids)  # the same rows, the same ids, in order
    failed = table[table["status"] != "ok"]
    assert list(failed["status"]) == ["failed_to_download"] * 2
    assert failed["influence"].isna().all()
    info = json.loads((out / "audit.json").read_text())
    assert info["source_id_column"] == "uid"
    train = load_training_set(folder)
    assert list(train.ids) == list(loaded.ids)
    np.testing.assert_array_equal(train.image, np.asarray(loaded.image, dtype=np.float32))


def test_id_column_rule(tmp_path):
    """Given: must exist. Else the manifest's, when unique over the usable rows, then
    key, uid, id, image_path, path; else row positions among the usable rows."""
    cols = {"key": lambda k, i: f"k{i}", "path": lambda k, i: f"img/{k}/{i}.jpg"}
    folder, val = _clip_retrieval_folder(tmp_path / "emb", cols)
    # "key" repeats across the two parts: not an id; "path" is the first unique one
    assert folder_id_column(folder) == "path"
    assert read_folder(folder).ids[40] == "img/1/1.jpg"
    assert read_folder(folder, id_col="key").id_column == "key"
    with pytest.raises(FolderError, match="id column 'uid' not in metadata"):
        read_folder(folder, id_col="uid")
    layout.write_manifest(folder, {"id_column": "caption"})  # the manifest's name goes first
    assert read_folder(folder).id_column == "caption"

    bare, val = _clip_retrieval_folder(tmp_path / "bare", {})  # no id column at all
    assert folder_id_column(bare) is None
    loaded = ecif.EmbeddingSet.load(bare)
    assert list(loaded.ids) == list(range(78))
    out = tmp_path / "audit"
    score_shards(bare, out, val, args=ARGS, log=lambda s: None)
    table = _scores(out)
    # ids are positions among the folder's usable rows, across shards, as in the loaded set
    assert list(table.loc[table["status"] == "ok", "id"]) == list(range(78))
    assert table.loc[table["status"] != "ok", "id"].isna().all()
    assert json.loads((out / "audit.json").read_text())["source_id_column"] is None


def _old_encoding(path):
    """Rewrite a part's ecif key-value metadata as ecif wrote it before: plain strings."""
    table = pq.read_table(path)
    kv = {
        k: (v if not k.startswith(b"ecif.") else str(json.loads(v)).encode())
        for k, v in (table.schema.metadata or {}).items()
    }
    pq.write_table(table.replace_schema_metadata(kv), path)


def test_part_metadata_is_json_and_the_old_plain_strings_still_read(tmp_path, tiny_clip_dir):
    data = ecif.datasets.shapes(12, seed=3, noise=0.0)
    data.to_parquet(tmp_path / "shards", shard_size=6)
    model = f"local-dir:{tiny_clip_dir}"
    emb = tmp_path / "emb"
    ecif.embed(tmp_path / "shards", emb, model=model, batch_size=4)
    meta_p = layout.part_paths(emb, 0)[2]
    raw = pq.read_schema(meta_p).metadata
    assert json.loads(raw[b"ecif.source"]) == "00000.parquet"
    assert layout.part_kv(meta_p)["ok"] == 6  # JSON: a number, not "6"

    for k in (0, 1):
        _old_encoding(layout.part_paths(emb, k)[2])
    assert pq.read_schema(meta_p).metadata[b"ecif.source"] == b"00000.parquet"
    kv = layout.part_kv(meta_p)
    assert kv["source"] == "00000.parquet" and kv["ok"] == 6 and kv["pretrained"] == ""
    again = ecif.embed(tmp_path / "shards", emb, model=model, batch_size=4)  # reads the old kv
    assert again.parts_skipped == 2 and again.skipped == 12 and again.parts_written == 0
    assert json.loads((emb / "manifest.json").read_text())["rows"]["ok"] == 12
    (emb / "manifest.json").unlink()  # the shard names now come from the parts' metadata
    assert [p.source for p in list_embedding_parts(emb)] == ["00000.parquet", "00001.parquet"]


def test_score_tables_keep_json_metadata(tmp_path):
    """Score tables were JSON before the encodings were shared; they read as before."""
    path = tmp_path / "s.parquet"
    table = pa.table({"id": [1, 2]})
    old = {b"ecif.options": b'{"lam": 0.01}', b"ecif.source": b'"/in/00000.parquet"'}
    pq.write_table(table.replace_schema_metadata(old), path)
    assert read_parquet_meta(path) == {"options": {"lam": 0.01}, "source": "/in/00000.parquet"}
