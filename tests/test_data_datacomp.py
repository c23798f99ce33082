"""DataComp-style metadata (`uid`, `text`) from embed to a subset file, through the CLI."""

import io
import json

import numpy as np
import pandas as pd
from PIL import Image

import ecif
from ecif.audit.export import array_to_uids, read_subset_file
from ecif.cli import main


def _datacomp_shards(folder, data, seed, shard_size=40):
    """Parquet shards shaped like DataComp metadata plus img2dataset's image bytes: uid (32
    hex), text, url, original_width; no key and no caption column."""
    rng = np.random.default_rng(seed)
    uids = ["".join(rng.choice(list("0123456789abcdef"), 32)) for _ in range(len(data))]
    folder.mkdir(parents=True)
    for s in range(0, len(data), shard_size):
        rows = range(s, min(len(data), s + shard_size))
        blobs = []
        for i in rows:
            buf = io.BytesIO()
            Image.fromarray(data.images[i]).save(buf, format="PNG")
            blobs.append(buf.getvalue())
        pd.DataFrame(
            {
                "uid": [uids[i] for i in rows],
                "url": [f"https://example.invalid/{i}.png" for i in rows],
                "text": [data.captions[i] for i in rows],
                "original_width": 64,
                "jpg": blobs,
                "sample": [f"s{i}" for i in rows],
                "alt_text": [f"alt {i}" for i in rows],
            }
        ).to_parquet(folder / f"{s // shard_size:05d}.parquet", index=False)
    return uids


def test_datacomp_shards_embed_score_and_export(tmp_path, tiny_clip_dir, capsys):
    train = ecif.datasets.shapes(n=120, seed=3, noise=0.2)
    val = ecif.datasets.shapes(n=60, seed=4, noise=0.0)
    uids = _datacomp_shards(tmp_path / "train", train, 0)
    _datacomp_shards(tmp_path / "val", val, 1)
    model = ["--model", f"local-dir:{tiny_clip_dir}", "--quiet", "--num-workers", "0"]
    for split in ("train", "val"):
        src, dst = str(tmp_path / split), str(tmp_path / f"emb_{split}")
        assert main(["embed", src, "-o", dst, *model]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "emb_train" / "manifest.json").read_text())
    assert manifest["id_column"] == "uid"
    es = ecif.EmbeddingSet.load(tmp_path / "emb_train")
    assert list(es.ids) == uids and list(es.metadata["text"]) == train.captions

    audit = tmp_path / "audit"
    score = ["score", str(tmp_path / "emb_train"), "--val", str(tmp_path / "emb_val")]
    assert (
        main([*score, "-o", str(audit), "--batch-size", "32", "--threshold", "0.2", "--quiet"]) == 0
    )
    out = tmp_path / "subset.npy"
    assert main(["export", str(audit), "--drop-flagged", "-o", str(out)]) == 0
    assert "DataComp subset file" in capsys.readouterr().out
    table, _ = ecif.audit.read_audit(audit)
    unflagged = set(table.loc[~table["is_misaligned"], "id"])
    assert len(unflagged) == 120 - 24
    assert set(array_to_uids(read_subset_file(out))) == unflagged


def test_explicit_columns_still_win(tmp_path, tiny_clip_dir):
    data = ecif.datasets.shapes(n=8, seed=5)
    _datacomp_shards(tmp_path / "in", data, 2, shard_size=8)
    res = ecif.embed(
        tmp_path / "in",
        tmp_path / "out",
        model=f"local-dir:{tiny_clip_dir}",
        id_col="sample",
        caption_col="alt_text",
    )
    assert res.ok == 8
    es = ecif.EmbeddingSet.load(tmp_path / "out")
    assert list(es.ids) == [f"s{i}" for i in range(8)]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["id_column"] == "sample"
    # the text embedding is that of the alt_text caption, not of `text`
    # row 0 embedded alone with alt_text as its `text`: the same text vector
    pd.DataFrame(
        {
            "uid": ["0" * 32],
            "text": ["alt 0"],
            "jpg": [pd.read_parquet(tmp_path / "in" / "00000.parquet")["jpg"][0]],
        }
    ).to_parquet(tmp_path / "one.parquet")
    ecif.embed(tmp_path / "one.parquet", tmp_path / "one", model=f"local-dir:{tiny_clip_dir}")
    one = ecif.EmbeddingSet.load(tmp_path / "one")
    assert np.allclose(np.asarray(es.text[0]), np.asarray(one.text[0]), atol=1e-3)
