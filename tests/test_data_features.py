"""``ecif embed --cache-features projection`` and ``ecif.data.features.load_features``.

The cache holds, per pair, the pooled features before the model's output projections; the
embeddings of the same run are those features through the projections (so unchanged), and
the reader gives the embedding reader's rows, order and ids.
"""

import io
import json
import signal
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

import ecif
from ecif import EmbeddingSet, datasets
from ecif.cli import main
from ecif.data import embed_stream, features
from ecif.data.features import FeatureCacheError, load_features
from ecif.data.folder_reader import read_folder
from ecif.data.layout import FolderError
from ecif.data.tiny_clip import register_config, tiny_config
from tests.test_data_resume import SLOW_CLI, wait_for_first_part

PROJ = "projection"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return datasets.shapes(24, seed=7, noise=0.25)


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _project(fs, side):
    t = fs.init["tensors"]
    x = fs.image if side == "image" else fs.text
    out = np.asarray(x, dtype=np.float64) @ t[f"{side}_proj"].double().numpy()
    if f"{side}_bias" in t:
        out = out + t[f"{side}_bias"].double().numpy()
    return _unit(out)


def test_cache_is_the_pre_projection_features_and_the_embeddings_are_unchanged(
    tmp_path, tiny_clip_dir, data
):
    data.to_parquet(tmp_path / "pq", shard_size=10, image_format="png")  # 3 parts
    model = f"local-dir:{tiny_clip_dir}"
    plain = ecif.embed(tmp_path / "pq", tmp_path / "plain", model=model, batch_size=8)
    res = ecif.embed(
        tmp_path / "pq", tmp_path / "out", model=model, batch_size=8, cache_features=PROJ
    )
    assert (res.ok, res.failed, res.parts_written) == (plain.ok, 0, 3) == (24, 0, 3)
    a, b = EmbeddingSet.load(tmp_path / "plain"), EmbeddingSet.load(tmp_path / "out")
    np.testing.assert_allclose(a.image.astype(np.float32), b.image.astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(a.text.astype(np.float32), b.text.astype(np.float32), atol=1e-3)
    assert not (tmp_path / "plain" / "features").exists()
    assert "features" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())

    fs = load_features(tmp_path / "out")
    assert fs.kind == PROJ and len(fs) == 24 and fs.image.dtype == np.float16
    assert fs.image.shape == (24, 32) and fs.text.shape == (24, 32)  # the towers' widths
    assert fs.ids.tolist() == b.ids.tolist() == data.frame["key"].tolist()
    assert fs.part.tolist() == [0] * 10 + [1] * 10 + [2] * 4
    for k in range(3):
        assert (tmp_path / "out" / "features" / f"img_feat_{k}.npy").exists()
        assert (tmp_path / "out" / "features" / f"text_feat_{k}.npy").exists()
    # the features through the stored projections, normalised, are the stored embeddings
    np.testing.assert_allclose(_project(fs, "image"), b.image.astype(np.float64), atol=3e-3)
    np.testing.assert_allclose(_project(fs, "text"), b.text.astype(np.float64), atol=3e-3)

    # the init is the model's own parameters; the features are open_clip's own pooled output
    net, _, pre = open_clip.create_model_and_transforms(model)
    net.eval()
    t = fs.init["tensors"]
    assert set(t) == {"image_proj", "text_proj"}
    assert torch.equal(t["image_proj"], net.visual.proj.detach())
    assert torch.equal(t["text_proj"], net.text_projection.detach())
    assert fs.init["log_scale"] == float(net.logit_scale.detach())
    assert (fs.init["model"], fs.init["pretrained"]) == (model, None)
    tok = open_clip.get_tokenizer(model)
    png = pd.read_parquet(tmp_path / "pq" / "00000.parquet")["png"]
    x = torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in png])
    with torch.no_grad():
        net.visual.proj, net.text_projection = None, None  # open_clip's forward, no projection
        ref_img = net.visual(x).numpy()
        ref_txt = net.encode_text(tok(data.captions[:10])).numpy()
    np.testing.assert_allclose(fs.image[:10].astype(np.float32), ref_img, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(fs.text[:10].astype(np.float32), ref_txt, rtol=2e-3, atol=2e-3)

    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["features"] == {
        "kind": PROJ,
        "dims": {"image": 32, "text": 32},
        "dtype": "float16",
        "init": "features/trainable_init.pt",
    }
    assert load_features(tmp_path / "out", dtype=np.float32).image.dtype == np.float32
    with pytest.raises(FolderError, match=r"has no feature cache \(embed with --cache-features"):
        load_features(tmp_path / "plain")


@pytest.mark.parametrize("custom_text", [False, True])
@pytest.mark.parametrize("proj_bias", [False, True])
def test_split_forward_equals_encode_for_parameter_and_linear_projections(custom_text, proj_bias):
    """CLIP (text layers on the model) and CustomTextCLIP (model.text); a Parameter text
    projection (x @ P) and a Linear one (x W^T + b)."""
    cfg = tiny_config(embed_dim=16, vision_width=32, vision_layers=1, text_layers=1)
    cfg["text_cfg"]["proj_bias"] = proj_bias
    torch.manual_seed(0)
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    net = cls(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = open_clip.tokenize(["a red circle", "two squares", "x"], context_length=16)
    with torch.no_grad():
        fu, fv, u, v = features.encode(net, x, tokens)
        ref_u, ref_v = net.encode_image(x), net.encode_text(tokens)
    assert fu.shape == (3, 32) and fv.shape == (3, 64)
    torch.testing.assert_close(u, ref_u)
    torch.testing.assert_close(v, ref_v)
    t = features.projection_tensors(net)
    assert ("text_bias" in t) == proj_bias and "image_bias" not in t
    text_proj = net.text.text_projection if custom_text else net.text_projection
    if proj_bias:
        assert torch.equal(t["text_proj"], text_proj.weight.detach().T)
        assert torch.equal(t["text_bias"], text_proj.bias.detach())
    else:
        assert torch.equal(t["text_proj"], text_proj.detach())
    torch.testing.assert_close(fv @ t["text_proj"] + t.get("text_bias", 0), ref_v)
    torch.testing.assert_close(fu @ t["image_proj"], ref_u)
    assert features.feature_dims(net) == (32, 64)


def test_a_model_without_a_split_is_refused_in_one_line():
    with pytest.raises(FeatureCacheError, match="needs an open_clip ViT image tower"):
        features.check_model(SimpleNamespace(model=torch.nn.Module(), name="m"))
    with pytest.raises(
        ValueError, match=r"cache_features must be None or one of \['projection', 'lora'\]"
    ):
        ecif.embed([], "nowhere", cache_features="head")


def test_linear_text_projection_with_bias_through_embed(tmp_path, monkeypatch, data):
    monkeypatch.setenv("ECIF_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_config(embed_dim=16, vision_width=32, vision_layers=1, text_width=32)
    cfg["text_cfg"].update(proj_bias=True, layers=1)
    name = register_config("ecif-test-linproj", cfg)
    data.to_parquet(tmp_path / "pq", shard_size=30)
    ecif.embed(tmp_path / "pq", tmp_path / "out", model=name, pretrained=None,
               random_init=True, cache_features=PROJ, batch_size=8)  # fmt: skip
    fs, es = load_features(tmp_path / "out"), EmbeddingSet.load(tmp_path / "out")
    assert set(fs.init["tensors"]) == {"image_proj", "text_proj", "text_bias"}
    assert fs.init["tensors"]["text_proj"].shape == (32, 16)
    np.testing.assert_allclose(_project(fs, "text"), es.text.astype(np.float64), atol=3e-3)
    np.testing.assert_allclose(_project(fs, "image"), es.image.astype(np.float64), atol=3e-3)


def test_reader_rows_and_ids_are_the_embedding_readers_with_failed_rows(
    tmp_path, tiny_clip_dir, data
):
    data.to_parquet(tmp_path / "pq", shard_size=10, image_format="png")
    shard = tmp_path / "pq" / "00001.parquet"
    t = pd.read_parquet(shard)
    t.loc[2, "png"] = b"not an image"
    t.loc[5, "caption"] = None
    t.loc[7, "key"] = t.loc[0, "key"]  # a pre-flight failure: zeroed after it was embedded
    t.to_parquet(shard)
    out = tmp_path / "out"
    res = ecif.embed(tmp_path / "pq", out, model=f"local-dir:{tiny_clip_dir}", batch_size=4,
                     cache_features=PROJ)  # fmt: skip
    assert (res.ok, res.failed) == (21, 3)
    for keep_failed in (False, True):
        es = EmbeddingSet.load(out, keep_failed=keep_failed)
        rows = read_folder(out, keep_failed=keep_failed)
        fs = load_features(out, keep_failed=keep_failed)
        assert len(fs) == len(es) == (24 if keep_failed else 21)
        assert fs.ids.tolist() == es.ids.tolist()
        assert fs.part.tolist() == rows.part.tolist()
        assert fs.metadata["key"].tolist() == es.metadata["key"].tolist()
    failed = es.metadata["status"].to_numpy() == "failed"
    assert failed.sum() == 3 and not fs.image[failed].any() and not fs.text[failed].any()
    assert fs.image[~failed].any(axis=1).all()
    fs, es = load_features(out), EmbeddingSet.load(out)
    assert fs.part.tolist() == [0] * 10 + [1] * 7 + [2] * 4
    np.testing.assert_allclose(_project(fs, "image"), es.image.astype(np.float64), atol=3e-3)
    np.testing.assert_allclose(_project(fs, "text"), es.text.astype(np.float64), atol=3e-3)
    assert (
        load_features(out, id_col="url").ids.tolist()
        == EmbeddingSet.load(out, id_col="url").ids.tolist()
    )

    # no id column qualifies: ids are positions among the usable rows, for both readers
    for p in (out / "metadata").iterdir():
        pd.read_parquet(p).drop(columns=["key"]).to_parquet(p)
    fs, es = load_features(out), EmbeddingSet.load(out)
    assert fs.ids.tolist() == es.ids.tolist() == list(range(21))


def test_mixing_a_cached_and_an_uncached_run_is_refused(tmp_path, tiny_clip_dir, data, capsys):
    data.to_parquet(tmp_path / "pq", shard_size=12)
    model = f"local-dir:{tiny_clip_dir}"
    ecif.embed(tmp_path / "pq", tmp_path / "plain", model=model)
    with pytest.raises(FolderError, match="part 0 was written without --cache-features and "
                       "this run asks for --cache-features projection"):  # fmt: skip
        ecif.embed(tmp_path / "pq", tmp_path / "plain", model=model, cache_features=PROJ)
    assert not (tmp_path / "plain" / "features").exists()  # refused before writing

    ecif.embed(tmp_path / "pq", tmp_path / "cached", model=model, cache_features=PROJ)
    rc = main(["embed", str(tmp_path / "pq"), "-o", str(tmp_path / "cached"),
               "--model", model, "--num-workers", "0", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "part 0 was written with --cache-features projection and this run has no" in err
    res = ecif.embed(tmp_path / "pq", tmp_path / "cached", model=model, cache_features=PROJ)
    assert (res.parts_skipped, res.skipped) == (2, 24)  # the same way: a plain resume


def test_ctrl_c_mid_part_leaves_no_feature_temps_and_the_rerun_completes(
    tmp_path, tiny_clip_dir, data, monkeypatch
):
    data.to_parquet(tmp_path / "pq", shard_size=6)  # 4 parts of 2 batches of 3
    model = f"local-dir:{tiny_clip_dir}"
    out = tmp_path / "out"
    encode, calls = embed_stream._encode, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the second batch of part 1
            raise KeyboardInterrupt
        return encode(*args, **kwargs)

    monkeypatch.setattr(embed_stream, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ecif.embed(tmp_path / "pq", out, model=model, batch_size=3, cache_features=PROJ)
    monkeypatch.setattr(embed_stream, "_encode", encode)
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["metadata_0.parquet"]
    assert sorted(p.name for p in (out / "features").iterdir()) == [
        "img_feat_0.npy", "text_feat_0.npy", "trainable_init.pt"
    ]  # fmt: skip
    assert len(load_features(out)) == 6  # the finished part reads already

    res = ecif.embed(tmp_path / "pq", out, model=model, batch_size=3, cache_features=PROJ)
    assert (res.parts_skipped, res.parts_written, res.ok + res.skipped) == (1, 3, 24)
    _check_complete(tmp_path, out, data, model)


def test_kill_then_rerun_with_the_cache_gives_every_row_exactly_once(tmp_path, tiny_clip_dir, data):
    data.to_parquet(tmp_path / "pq", shard_size=3)  # 8 parts
    model = f"local-dir:{tiny_clip_dir}"
    out = tmp_path / "out"
    cmd = [*SLOW_CLI, "embed", str(tmp_path / "pq"), "-o", str(out), "--model", model,
           "--batch-size", "2", "--num-workers", "0", "--cache-features", PROJ, "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_first_part(proc, out)
    time.sleep(0.3)  # inside a later part
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted((out / "metadata").glob("metadata_*.parquet"))
    assert 1 <= len(finished) < 8, f"kill did not land mid-run: {finished}"
    for p in finished:  # a part with metadata has its features
        k = p.stem.split("_")[1]
        assert (out / "features" / f"img_feat_{k}.npy").exists()
        assert (out / "features" / f"text_feat_{k}.npy").exists()

    res = ecif.embed(tmp_path / "pq", out, model=model, batch_size=8, cache_features=PROJ)
    assert res.parts_skipped == len(finished) and res.ok + res.skipped == 24
    _check_complete(tmp_path, out, data, model)


def _check_complete(tmp_path, out, data, model):
    """Every row once, in input order, features as a clean run's; no temp files."""
    assert not list(out.rglob(".*.tmp")), "temp files left behind"
    fs, es = load_features(out), EmbeddingSet.load(out)
    assert fs.ids.tolist() == es.ids.tolist() == data.frame["key"].tolist()
    clean = tmp_path / "clean"
    ecif.embed(tmp_path / "pq", clean, model=model, batch_size=8, cache_features=PROJ)
    ref = load_features(clean)
    np.testing.assert_allclose(fs.image.astype(np.float32), ref.image.astype(np.float32),
                               rtol=2e-3, atol=2e-3)  # fmt: skip
    np.testing.assert_allclose(fs.text.astype(np.float32), ref.text.astype(np.float32),
                               rtol=2e-3, atol=2e-3)  # fmt: skip


def test_dask_distributor_writes_the_same_cache(tmp_path, tiny_clip_dir, data, capsys):
    data.to_parquet(tmp_path / "pq", shard_size=7)  # 4 shards -> 4 tasks
    model = f"local-dir:{tiny_clip_dir}"
    ecif.embed(tmp_path / "pq", tmp_path / "local", model=model, batch_size=5,
               cache_features=PROJ)  # fmt: skip
    rc = main(["embed", str(tmp_path / "pq"), "-o", str(tmp_path / "dask"), "--model", model,
               "--batch-size", "5", "--distributor", "dask", "--cache-features", PROJ,
               "--quiet"])  # fmt: skip
    assert rc == 0 and "embedded: ok=24 failed=0" in capsys.readouterr().out
    a, b = load_features(tmp_path / "local"), load_features(tmp_path / "dask")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.text, b.text)
    assert a.ids.tolist() == b.ids.tolist() and a.part.tolist() == b.part.tolist()
    man = json.loads((tmp_path / "dask" / "manifest.json").read_text())
    assert man["complete"] and man["features"]["kind"] == PROJ
