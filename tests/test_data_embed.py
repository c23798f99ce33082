"""ecif.embed: parquet / tar / folder inputs against a direct open_clip forward; bad rows."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import ecif
from ecif import EmbeddingSet, datasets
from ecif.cli import main
from ecif.data.readers import InputError


@pytest.fixture(scope="module")
def data():
    return datasets.shapes(24, seed=7, noise=0.25)


def _png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _reference(model_dir, data):
    """Embeddings from a plain open_clip forward, independent of ecif's pipeline."""
    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    x = torch.stack([pre(Image.open(io.BytesIO(_png(im))).convert("RGB")) for im in data.images])
    with torch.no_grad():
        u = model.encode_image(x, normalize=True).numpy()
        v = model.encode_text(tok(data.captions), normalize=True).numpy()
    return u, v


def test_tar_folder_ignores_img2dataset_sidecar_parquet(tmp_path, tiny_clip_dir, data):
    _write_tar(tmp_path / "00000.tar", data)
    data.frame[["key", "caption"]].assign(status="success").to_parquet(tmp_path / "00000.parquet")
    res = ecif.embed(tmp_path, tmp_path / "out", model=f"local-dir:{tiny_clip_dir}")
    assert (res.ok, res.failed, res.parts_written) == (24, 0, 1)


def _write_tar(path, data):
    """A webdataset shard as img2dataset writes it: key.png, key.txt, key.json."""
    with tarfile.open(path, "w") as tf:
        for i, r in enumerate(data.frame.itertuples()):
            payloads = {
                "png": _png(data.images[i]),
                "txt": r.caption.encode(),
                "json": json.dumps(
                    {"key": r.key, "caption": r.caption, "status": "success"}
                ).encode(),
            }
            for ext, blob in payloads.items():
                ti = tarfile.TarInfo(f"{r.key}.{ext}")
                ti.size = len(blob)
                tf.addfile(ti, io.BytesIO(blob))


def _write_folder(root, data):
    (root / "images").mkdir(parents=True)
    rows = []
    for i, r in enumerate(data.frame.itertuples()):
        Image.fromarray(data.images[i]).save(root / "images" / f"{r.key}.png")
        rows.append({"path": f"images/{r.key}.png", "caption": r.caption})
    pd.DataFrame(rows).to_csv(root / "captions.csv", index=False)


def test_parquet_tar_and_folder_match_direct_open_clip(tmp_path, tiny_clip_dir, data):
    u, v = _reference(tiny_clip_dir, data)
    model = f"local-dir:{tiny_clip_dir}"
    data.to_parquet(tmp_path / "pq", shard_size=10, image_format="png")
    (tmp_path / "tar").mkdir()
    _write_tar(tmp_path / "tar" / "00000.tar", data)
    _write_folder(tmp_path / "folder", data)
    for name in ("pq", "tar", "folder"):
        res = ecif.embed(tmp_path / name, tmp_path / f"out-{name}", model=model, batch_size=7)
        assert (res.ok, res.failed) == (24, 0), name
        es = EmbeddingSet.load(tmp_path / f"out-{name}")
        assert es.metadata["caption"].tolist() == data.captions, name
        np.testing.assert_allclose(es.image.astype(np.float32), u, atol=2e-3, err_msg=name)
        np.testing.assert_allclose(es.text.astype(np.float32), v, atol=2e-3, err_msg=name)
    es = EmbeddingSet.load(tmp_path / "out-pq")
    assert es.ids.tolist() == data.frame["key"].tolist()
    assert es.metadata["is_corrupted"].tolist() == data.frame["is_corrupted"].tolist()
    man = json.loads((tmp_path / "out-pq" / "manifest.json").read_text())
    assert man["dims"] == {"image": 32, "text": 32}
    assert man["rows"] == {"total": 24, "ok": 24, "failed": 0}
    assert man["complete"] and len(man["parts"]) == 3 and man["ecif_version"] == ecif.__version__
    # the model's own logit scale travels with the set (the engine's default temperature)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    assert es.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)
    assert es.split(0.25)[1].logit_scale == es.logit_scale


def test_workers_give_the_same_result(tmp_path, tiny_clip_dir, data):
    data.to_parquet(tmp_path / "pq", shard_size=10)
    # small row groups that do not line up with the reader's chunks
    t = pq.read_table(tmp_path / "pq" / "00001.parquet")
    pq.write_table(t, tmp_path / "pq" / "00001.parquet", row_group_size=4)
    pq.write_table(t.slice(0, 0), tmp_path / "pq" / "00003.parquet")  # an empty shard
    model = f"local-dir:{tiny_clip_dir}"
    ecif.embed(tmp_path / "pq", tmp_path / "a", model=model, batch_size=4)
    ecif.embed(
        tmp_path / "pq", tmp_path / "b", model=model, batch_size=4, num_workers=2, chunk_rows=3
    )
    a, b = EmbeddingSet.load(tmp_path / "a"), EmbeddingSet.load(tmp_path / "b")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.text, b.text)
    assert a.ids.tolist() == b.ids.tolist() and len(a) == 24
    assert len(list((tmp_path / "b" / "metadata").glob("*.parquet"))) == 4


def test_bad_rows_are_kept_with_status_and_zero_embeddings(tmp_path, tiny_clip_dir, data):
    data.to_parquet(tmp_path / "pq", shard_size=100, image_format="png")
    t = pd.read_parquet(tmp_path / "pq" / "00000.parquet")
    t.loc[1, "png"] = b"not an image at all"
    t.loc[2, "png"] = None
    t.loc[3, "caption"] = "   "
    t.loc[4, "caption"] = None
    t.loc[5, "key"] = None
    t.loc[6, "key"] = t.loc[0, "key"]
    t.to_parquet(tmp_path / "pq" / "00000.parquet")
    res = ecif.embed(tmp_path / "pq", tmp_path / "out", model=f"local-dir:{tiny_clip_dir}")
    assert (res.ok, res.failed) == (18, 6)
    assert res.errors == {"undecodable image": 1, "missing image": 1, "empty caption": 2,
                          "null id": 1, "duplicate id": 1}  # fmt: skip
    es = EmbeddingSet.load(tmp_path / "out", keep_failed=True)
    m = es.metadata
    assert m["status"].tolist() == ["ok"] + ["failed"] * 6 + ["ok"] * 17
    msgs = m["error_message"].tolist()
    assert msgs[1].startswith("undecodable image") and msgs[2].startswith("missing image")
    assert msgs[3] == "empty caption" and msgs[4].startswith("empty caption")
    assert msgs[5].startswith("null id") and msgs[6].startswith("duplicate id")
    assert not es.image[1:7].any() and not es.text[1:7].any()
    assert es.image[7:].any(axis=1).all()
    clean = EmbeddingSet.load(tmp_path / "out")
    assert len(clean) == 18 and (clean.metadata["status"] == "ok").all()


def test_missing_file_in_folder_table(tmp_path, tiny_clip_dir, data):
    _write_folder(tmp_path / "f", data)
    (tmp_path / "f" / "images" / f"{data.frame.key[3]}.png").unlink()
    res = ecif.embed(tmp_path / "f", tmp_path / "out", model=f"local-dir:{tiny_clip_dir}")
    assert (res.ok, res.failed) == (23, 1)
    m = EmbeddingSet.load(tmp_path / "out", keep_failed=True).metadata
    assert m["error_message"][3].startswith("missing file") and m["status"][3] == "failed"


def test_missing_column_and_wrong_id_type_are_clear_errors(tmp_path, tiny_clip_dir, data):
    data.to_parquet(tmp_path / "pq", shard_size=100)
    shard = tmp_path / "pq" / "00000.parquet"
    model = f"local-dir:{tiny_clip_dir}"
    with pytest.raises(InputError, match=r"00000\.parquet: caption column 'text_en' not found"):
        ecif.embed(shard, tmp_path / "o1", model=model, caption_col="text_en")
    with pytest.raises(InputError, match="'jpg' is taken as both the caption and the image"):
        ecif.embed(shard, tmp_path / "o1", model=model, caption_col="jpg")  # a KeyError before
    t = pd.read_parquet(shard)
    t.drop(columns=["caption"]).to_parquet(tmp_path / "nocap.parquet")
    with pytest.raises(InputError, match=r"nocap\.parquet: no caption column"):
        ecif.embed(tmp_path / "nocap.parquet", tmp_path / "o2", model=model)
    t.assign(key=np.linspace(0.5, 3.5, len(t))).to_parquet(tmp_path / "floatid.parquet")
    with pytest.raises(InputError, match=r"floatid\.parquet: id column 'key' holds non-integer"):
        ecif.embed(tmp_path / "floatid.parquet", tmp_path / "o3", model=model)
    # whole floats (ints promoted by a null) are accepted as integer ids
    t.assign(key=np.arange(len(t), dtype=float)).to_parquet(tmp_path / "wholeid.parquet")
    ecif.embed(tmp_path / "wholeid.parquet", tmp_path / "o4", model=model)
    assert EmbeddingSet.load(tmp_path / "o4").ids.tolist() == list(range(len(t)))


def test_rerun_skips_finished_parts(tmp_path, tiny_clip_dir, data):
    data.to_parquet(tmp_path / "pq", shard_size=10)
    model = f"local-dir:{tiny_clip_dir}"
    ecif.embed(tmp_path / "pq", tmp_path / "out", model=model)
    first = (tmp_path / "out" / "img_emb" / "img_emb_0.npy").stat().st_mtime_ns
    res = ecif.embed(tmp_path / "pq", tmp_path / "out", model=model)
    assert (res.ok, res.skipped, res.parts_skipped) == (0, 24, 3)
    assert (tmp_path / "out" / "img_emb" / "img_emb_0.npy").stat().st_mtime_ns == first


def test_cli_embed_prints_summary(tmp_path, tiny_clip_dir, data, capsys):
    data.to_parquet(tmp_path / "pq", shard_size=10)
    rc = main(["embed", str(tmp_path / "pq"), "-o", str(tmp_path / "out"),
               "--model", f"local-dir:{tiny_clip_dir}", "--batch-size", "8",
               "--num-workers", "0", "--quiet"])  # fmt: skip
    assert rc == 0
    assert "embedded: ok=24 failed=0 skipped=0" in capsys.readouterr().out
    rc = main(["embed", str(tmp_path / "pq"), "-o", str(tmp_path / "o2"),
               "--model", f"local-dir:{tiny_clip_dir}", "--caption-col", "nope"])  # fmt: skip
    assert rc == 2 and "caption column 'nope' not found" in capsys.readouterr().err


def test_shapes_embedded_is_a_ready_cached_folder(tmp_path, monkeypatch, tiny_clip_dir):
    monkeypatch.setenv("ECIF_CACHE_DIR", str(tmp_path / "cache"))
    assert datasets.cache_dir() == tmp_path / "cache"
    kw = dict(n=40, noise=0.25, shard_size=16, model_dir=tiny_clip_dir)
    folder = datasets.shapes_embedded(**kw)
    assert folder.is_relative_to(tmp_path / "cache")
    es = EmbeddingSet.load(folder)
    assert len(es) == 40 and es.metadata["is_corrupted"].sum() == 10
    assert es.metadata["caption"].tolist() == datasets.shapes(40, noise=0.25).captions
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert datasets.shapes_embedded(**kw) == folder  # cached: not embedded again
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp


def test_input_variants_tar_gaps_and_struct_image_column(tmp_path, tiny_clip_dir, data):
    """A tar sample without image, one with its caption only in .json; an HF-style
    {bytes, path} image column; all compared with the plain parquet result."""
    model = f"local-dir:{tiny_clip_dir}"
    data.to_parquet(tmp_path / "pq", shard_size=100, image_format="png")
    ecif.embed(tmp_path / "pq", tmp_path / "ref", model=model)
    ref = EmbeddingSet.load(tmp_path / "ref")

    _write_tar(tmp_path / "full.tar", data)
    with tarfile.open(tmp_path / "full.tar") as src, tarfile.open(tmp_path / "t.tar", "w") as dst:
        for m in src.getmembers():
            if m.name in (f"{data.frame.key[2]}.png", f"{data.frame.key[5]}.txt"):
                continue  # sample 2 loses its image, sample 5 its .txt (caption stays in .json)
            dst.addfile(m, src.extractfile(m))
    ecif.embed(tmp_path / "t.tar", tmp_path / "out-tar", model=model)
    es = EmbeddingSet.load(tmp_path / "out-tar", keep_failed=True)
    assert es.metadata["status"].tolist() == ["ok"] * 2 + ["failed"] + ["ok"] * 21
    assert es.metadata["error_message"][2].startswith("missing image")
    keep = np.arange(24) != 2
    np.testing.assert_allclose(es.image[keep].astype(np.float32), ref.image[keep], atol=2e-3)
    np.testing.assert_allclose(es.text[keep].astype(np.float32), ref.text[keep], atol=2e-3)

    t = pd.read_parquet(tmp_path / "pq" / "00000.parquet")
    t["image"] = [{"bytes": b, "path": None} for b in t.pop("png")]
    t.to_parquet(tmp_path / "hf.parquet")
    ecif.embed(tmp_path / "hf.parquet", tmp_path / "out-hf", model=model, image_col="image")
    es = EmbeddingSet.load(tmp_path / "out-hf")
    assert np.array_equal(es.image, ref.image) and np.array_equal(es.text, ref.text)
    # the {bytes: None, path: ...} form, paths relative to the parquet file
    _write_folder(tmp_path / "hfp", data)
    t["image"] = [{"bytes": None, "path": f"images/{k}.png"} for k in t["key"]]
    t.to_parquet(tmp_path / "hfp" / "hf.parquet")
    ecif.embed(tmp_path / "hfp" / "hf.parquet", tmp_path / "out-hfp", model=model)
    es = EmbeddingSet.load(tmp_path / "out-hfp")
    assert np.array_equal(es.image, ref.image) and np.array_equal(es.text, ref.text)


def test_shapes_sets_gives_noisy_train_and_clean_val(tmp_path, monkeypatch, tiny_clip_dir):
    monkeypatch.setenv("ECIF_CACHE_DIR", str(tmp_path / "cache"))
    train, val = datasets.shapes_sets(n=30, noise=0.2, n_val=12, model_dir=tiny_clip_dir)
    assert (len(train), len(val)) == (30, 12)
    assert train.metadata["is_corrupted"].sum() == 6 and not val.metadata["is_corrupted"].any()
    assert not set(train.ids) & set(val.ids)
    assert train.logit_scale and train.d_image == val.d_image == 32


def test_dask_distributor_matches_local(tmp_path, tiny_clip_dir, data, capsys):
    data.to_parquet(tmp_path / "pq", shard_size=7)  # 4 shards -> 4 tasks
    model = f"local-dir:{tiny_clip_dir}"
    ecif.embed(tmp_path / "pq", tmp_path / "local", model=model, batch_size=5)
    rc = main(["embed", str(tmp_path / "pq"), "-o", str(tmp_path / "dask"), "--model", model,
               "--batch-size", "5", "--distributor", "dask", "--quiet"])  # fmt: skip
    assert rc == 0 and "embedded: ok=24 failed=0" in capsys.readouterr().out
    a, b = EmbeddingSet.load(tmp_path / "local"), EmbeddingSet.load(tmp_path / "dask")
    # single-threaded workers sum a convolution in another order than this process's threads
    # (measured: one image coordinate 1 float16 step apart); equal to float16 rounding
    for side in ("image", "text"):
        np.testing.assert_allclose(
            np.asarray(getattr(a, side), np.float32),
            np.asarray(getattr(b, side), np.float32),
            rtol=2**-10,
            atol=1e-6,
            err_msg=side,
        )
    assert a.ids.tolist() == b.ids.tolist()
    man = json.loads((tmp_path / "dask" / "manifest.json").read_text())
    assert man["complete"] and man["rows"]["ok"] == 24 and len(man["parts"]) == 4


def test_manifest_records_absolute_and_relative_shard_paths(
    tmp_path, tiny_clip_dir, data, monkeypatch
):
    from ecif.data import layout

    work = tmp_path / "work"
    data.to_parquet(work / "in" / "train", shard_size=10)
    monkeypatch.chdir(work)  # relative paths, as typed in a shell
    ecif.embed("in/train", "emb", model=f"local-dir:{tiny_clip_dir}")
    monkeypatch.chdir(tmp_path)  # elsewhere: the app's working folder
    man = json.loads((work / "emb" / "manifest.json").read_text())
    src = [p["source"] for p in man["parts"]]
    assert src == [str(work / "in" / "train" / f"{k:05d}.parquet") for k in range(3)]
    assert man["input_shards"] == src and man["input_root"] == str(work / "in" / "train")
    assert [p["source_relative"] for p in man["parts"]][0] == "../in/train/00000.parquet"
    assert layout.part_sources(work / "emb") == dict(enumerate(src))

    moved = tmp_path / "moved"  # the embeddings and their data moved together
    (work / "in").rename(tmp_path / "in")
    (work / "emb").rename(tmp_path / "emb")
    assert layout.part_sources(tmp_path / "emb")[1] == str(
        tmp_path / "in" / "train" / "00001.parquet"
    )
    (tmp_path / "in" / "train").rename(moved)  # the data alone moved: --data-root
    assert not Path(layout.part_sources(tmp_path / "emb")[0]).exists()
    assert layout.part_sources(tmp_path / "emb", moved)[2] == str(moved / "00002.parquet")


def test_cli_embed_in_which_every_row_failed_exits_2(tmp_path, tiny_clip_dir, capsys):
    pd.DataFrame({"path": ["gone/a.png", "gone/b.png"], "caption": ["a", "b"]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    rc = main(["embed", str(tmp_path / "t.csv"), "-o", str(tmp_path / "out"),
               "--model", f"local-dir:{tiny_clip_dir}", "--num-workers", "0", "--quiet"])  # fmt: skip
    assert rc == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: every row failed (2: 2 x missing file)")
    assert "embedded:" not in cap.out
    meta = pd.read_parquet(tmp_path / "out" / "metadata" / "metadata_0.parquet")
    assert (meta["status"] == "failed").all()  # the rows and their reasons are kept


def test_model_mismatch_message_names_models_readably(tmp_path, tiny_clip_dir, data, capsys):
    data.to_parquet(tmp_path / "pq", shard_size=30)
    ecif.embed(tmp_path / "pq", tmp_path / "out", model=f"local-dir:{tiny_clip_dir}")
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    man["model"] = "local-dir:/elsewhere/model"
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(man))
    rc = main(["embed", str(tmp_path / "pq"), "-o", str(tmp_path / "out"),
               "--model", f"local-dir:{tiny_clip_dir}", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "written with model local-dir:/elsewhere/model, not local-dir:" in err
    assert "/None" not in err and len(err.strip().splitlines()) == 1
