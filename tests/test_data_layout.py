"""clip-retrieval folders: write, load (memory-mapped), failed rows, broken folders."""

import logging

import numpy as np
import pandas as pd
import pytest

from ecif import EmbeddingSet
from ecif.data.embedding_set import load_folder
from ecif.data.layout import FolderError


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clip_retrieval_folder(root, sizes, d=8, seed=0, status=None):
    """A folder as clip-retrieval writes it: numbered parts, float16, no manifest."""
    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    imgs, txts, metas = [], [], []
    start = 0
    for n, size in enumerate(sizes):
        img, txt = _unit(rng, size, d).astype(np.float16), _unit(rng, size, d).astype(np.float16)
        meta = pd.DataFrame(
            {
                "image_path": [f"img/{start + i:05d}.jpg" for i in range(size)],
                "caption": [f"caption {start + i}" for i in range(size)],
            }
        )
        if status is not None:
            meta["status"] = status[start : start + size]
        np.save(root / "img_emb" / f"img_emb_{n}.npy", img)
        np.save(root / "text_emb" / f"text_emb_{n}.npy", txt)
        meta.to_parquet(root / "metadata" / f"metadata_{n}.parquet")
        imgs.append(img)
        txts.append(txt)
        metas.append(meta)
        start += size
    return np.concatenate(imgs), np.concatenate(txts), pd.concat(metas, ignore_index=True)


def test_load_clip_retrieval_single_part_is_memory_mapped(tmp_path):
    img, txt, meta = _clip_retrieval_folder(tmp_path, [40])
    es = EmbeddingSet.load(tmp_path)
    assert isinstance(es.image, np.memmap) and isinstance(es.text, np.memmap)
    assert np.array_equal(es.image, img) and np.array_equal(es.text, txt)
    assert es.ids.tolist() == meta["image_path"].tolist()


def test_load_clip_retrieval_parts_in_numeric_order(tmp_path):
    # 12 parts: part 10 must come after part 9, not after part 1
    img, txt, meta = _clip_retrieval_folder(tmp_path, [3] * 12)
    es = EmbeddingSet.load(tmp_path)
    assert np.array_equal(es.image, img) and np.array_equal(es.text, txt)
    assert es.metadata["caption"].tolist() == meta["caption"].tolist()


def test_large_folders_are_gathered_into_a_memmap(tmp_path, monkeypatch):
    monkeypatch.setenv("ECIF_CACHE_DIR", str(tmp_path / "cache"))
    img, txt, _ = _clip_retrieval_folder(tmp_path / "f", [20, 30])
    es = load_folder(tmp_path / "f", in_memory_limit=0)
    assert isinstance(es.image, np.memmap)
    assert np.array_equal(es.image, img) and np.array_equal(es.text, txt)
    again = load_folder(tmp_path / "f", in_memory_limit=0)  # reuses the consolidated file
    assert again.image.filename == es.image.filename
    assert np.array_equal(again.text, txt)
    # changed folder files -> a new consolidated file, with the new values
    np.save(tmp_path / "f" / "text_emb" / "text_emb_1.npy", np.zeros((30, 8), np.float16))
    changed = load_folder(tmp_path / "f", in_memory_limit=0)
    assert changed.text.filename != es.text.filename and not changed.text[20:].any()


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    meta = pd.DataFrame({"caption": [f"c{i}" for i in range(30)], "x": np.arange(30)})
    es = EmbeddingSet(
        _unit(rng, 30, 6), _unit(rng, 30, 5), ids=[f"id{i}" for i in range(30)], metadata=meta
    )
    es.save(tmp_path, part_rows=7)
    back = EmbeddingSet.load(tmp_path)
    assert back.ids.tolist() == es.ids.tolist()
    assert back.image.dtype == np.float16
    np.testing.assert_allclose(back.image, es.image, atol=1e-3)
    np.testing.assert_allclose(back.text, es.text, atol=1e-3)
    assert back.metadata["x"].tolist() == list(range(30))


def test_failed_rows_dropped_by_default_and_kept_on_request(tmp_path, caplog):
    status = ["ok"] * 5 + ["success"] * 5  # img2dataset's word counts as ok too
    status[2] = status[7] = "failed"
    _clip_retrieval_folder(tmp_path, [4, 6], status=status)
    with caplog.at_level(logging.WARNING):
        es = EmbeddingSet.load(tmp_path)
    assert len(es) == 8
    assert "dropped 2 of 10" in caplog.text
    assert "caption 2" not in es.metadata["caption"].tolist()
    assert len(EmbeddingSet.load(tmp_path, keep_failed=True)) == 10


def test_mismatched_widths_name_the_file(tmp_path):
    _clip_retrieval_folder(tmp_path, [5, 5], d=8)
    np.save(tmp_path / "img_emb" / "img_emb_1.npy", np.zeros((5, 12), np.float16))
    with pytest.raises(FolderError, match=r"img_emb_1\.npy.*width 12"):
        EmbeddingSet.load(tmp_path)


def test_row_count_disagreement_and_missing_files(tmp_path):
    _clip_retrieval_folder(tmp_path, [5, 5])
    np.save(tmp_path / "text_emb" / "text_emb_1.npy", np.zeros((4, 8), np.float16))
    with pytest.raises(FolderError, match="part 1 rows disagree"):
        EmbeddingSet.load(tmp_path)
    (tmp_path / "text_emb" / "text_emb_1.npy").unlink()
    with pytest.raises(FolderError, match=r"text_emb_1\.npy: missing"):
        EmbeddingSet.load(tmp_path)
    with pytest.raises(FolderError, match="not an embedding folder"):
        EmbeddingSet.load(tmp_path / "img_emb")
