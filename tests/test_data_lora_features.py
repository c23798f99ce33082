"""``ecif embed --cache-features lora``: the token states entering block L-k of each tower.

The cached rows, run through the model's OWN last k blocks, final norms, pooling and
projections (open_clip's modules, not ecif's functional copy), give the model's own
``encode_image`` / ``encode_text``; the stored embeddings are unchanged; the init holds the
model's own weights; a rerun with another k is refused.
"""

import io
import json

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

import ecif
from ecif import EmbeddingSet, datasets
from ecif.cli import main
from ecif.data import features
from ecif.data import lora_features as lf
from ecif.data.features import FeatureCacheError, load_features
from ecif.data.layout import FolderError
from ecif.data.tiny_clip import save_local_dir, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return datasets.shapes(12, seed=3, noise=0.25)


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(model, folder, data, fs):
    """The model's own embeddings of the folder's rows, and the cached rows finished through
    its own last k blocks (both normalised, float64)."""
    net, _, pre = open_clip.create_model_and_transforms(model)
    net.eval()
    tok = open_clip.get_tokenizer(model)
    png = pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))])["png"]
    x = torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in png])
    k = fs.init["config"]["blocks"]
    with torch.no_grad():
        ref = net.encode_image(x), net.encode_text(tok(data.captions))
        got = lf.finish(
            net, torch.from_numpy(fs.image.astype(np.float32)),
            torch.from_numpy(fs.text.astype(np.float32)), k,
        )  # fmt: skip
    return net, [_unit(r.numpy()) for r in ref], [_unit(g.numpy()) for g in got]


def test_cached_states_through_the_last_block_give_encode_image_and_encode_text(
    tmp_path, tiny_clip_dir, data
):
    data.to_parquet(tmp_path / "pq", shard_size=5, image_format="png")  # 3 parts
    model = f"local-dir:{tiny_clip_dir}"
    res = ecif.embed(tmp_path / "pq", tmp_path / "out", model=model, batch_size=4,
                     cache_features="lora")  # fmt: skip
    assert (res.ok, res.failed, res.parts_written) == (12, 0, 3)
    fs, es = load_features(tmp_path / "out"), EmbeddingSet.load(tmp_path / "out")
    assert fs.kind == "lora" and fs.image.dtype == np.float16
    cfg = fs.init["config"]
    assert cfg["blocks"] == 1
    ti, tt = cfg["image"]["tokens"], cfg["text"]["tokens"]
    assert (ti, tt) == (17, 16)  # 1 + (32/8)^2 patches; the context length
    assert fs.image.shape == (12, ti * 32) and fs.text.shape == (12, 1 + tt * 32)
    assert fs.ids.tolist() == es.ids.tolist() == data.frame["key"].tolist()
    assert fs.part.tolist() == [0] * 5 + [1] * 5 + [2] * 2
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())["features"]
    assert man == {"kind": "lora", "dims": {"image": ti * 32, "text": 1 + tt * 32},
                   "dtype": "float16", "init": "features/trainable_init.pt", "blocks": 1}  # fmt: skip

    net, (ref_u, ref_v), (u, v) = _reference(model, tmp_path / "pq", data, fs)
    # the text rows start with the pooled position: CLIP's EOT, the largest token id
    eot = open_clip.get_tokenizer(model)(data.captions).argmax(-1).numpy()
    assert fs.text[:, 0].astype(np.int64).tolist() == eot.tolist()
    np.testing.assert_allclose(u, ref_u, atol=3e-3)  # fp16 states
    np.testing.assert_allclose(v, ref_v, atol=3e-3)
    np.testing.assert_allclose(es.image.astype(np.float64), ref_u, atol=2e-3)  # unchanged
    np.testing.assert_allclose(es.text.astype(np.float64), ref_v, atol=2e-3)
    # the init is the model's own weights (the last block, the final norms, the projections)
    t = fs.init["tensors"]
    blk = net.visual.transformer.resblocks[-1]
    assert torch.equal(t["image.blocks.0.attn_in.weight"], blk.attn.in_proj_weight.detach())
    assert torch.equal(t["image.blocks.0.mlp_proj.bias"], blk.mlp.c_proj.bias.detach())
    assert torch.equal(t["text.norm.weight"], net.ln_final.weight.detach())
    assert torch.equal(t["image_proj"], net.visual.proj.detach())
    assert cfg["text"]["causal"] and cfg["text"]["pool"] == "argmax"
    assert cfg["image"]["pool"] == "tok" and cfg["image"]["activation"] == "gelu"

    # a rerun with the projection cache into the same folder is refused, the same way resumes
    with pytest.raises(FolderError, match="asks for --cache-features projection"):
        ecif.embed(tmp_path / "pq", tmp_path / "out", model=model, cache_features="projection")
    res = ecif.embed(tmp_path / "pq", tmp_path / "out", model=model, cache_features="lora")
    assert res.parts_skipped == 3


def test_two_last_blocks_through_the_cli(tmp_path, data):
    cfg = tiny_config(embed_dim=16, vision_width=32, vision_layers=3, text_width=32,
                      text_layers=2)  # fmt: skip
    torch.manual_seed(0)
    net = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    name = f"local-dir:{save_local_dir(net, cfg, tmp_path / 'model')}"
    data.to_parquet(tmp_path / "pq", shard_size=7, image_format="png")
    rc = main(["embed", str(tmp_path / "pq"), "-o", str(tmp_path / "out"), "--model", name,
               "--num-workers", "0", "--batch-size", "5", "--quiet",
               "--cache-features", "lora", "--cache-blocks", "2"])  # fmt: skip
    assert rc == 0
    fs = load_features(tmp_path / "out")
    assert fs.init["config"]["blocks"] == 2
    assert {"image.blocks.1.ln_2.bias", "text.blocks.1.mlp_fc.weight"} <= set(fs.init["tensors"])
    assert "image.blocks.2.ln_2.bias" not in fs.init["tensors"]
    _, (ref_u, ref_v), (u, v) = _reference(name, tmp_path / "pq", data, fs)
    np.testing.assert_allclose(u, ref_u, atol=3e-3)
    np.testing.assert_allclose(v, ref_v, atol=3e-3)
    # a rerun with another k into the same folder is refused before anything is written
    with pytest.raises(FolderError, match="written with --cache-features lora:2 and this run "
                       "asks for --cache-features lora:1"):  # fmt: skip
        ecif.embed(tmp_path / "pq", tmp_path / "out", model=name, cache_features="lora")
    res = ecif.embed(tmp_path / "pq", tmp_path / "out", model=name, cache_features="lora",
                     cache_blocks=2)  # fmt: skip
    assert res.parts_skipped == 2


@pytest.mark.parametrize("custom_text", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_split_at_block_l_minus_k_equals_encode(custom_text, k):
    """CLIP and CustomTextCLIP, GELU and QuickGELU, in float32 without the fp16 store."""
    cfg = tiny_config(embed_dim=16, vision_width=32, vision_layers=2, text_width=32,
                      text_layers=3)  # fmt: skip
    torch.manual_seed(0)
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    net = cls(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=custom_text)
    net.eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = open_clip.tokenize(["a red circle", "two squares", "x"], context_length=16)
    with torch.no_grad():
        fi, ft, u, v = features.encode(net, x, tokens, "lora", k)
        ref_u, ref_v = net.encode_image(x), net.encode_text(tokens)
        fu, fv = lf.finish(net, fi, ft, k)
    assert (fi.shape[1], ft.shape[1]) == lf.dims(net, k) == (17 * 32, 1 + 16 * 32)
    assert ft[:, 0].tolist() == tokens.argmax(-1).tolist()
    for got in ((u, v), (fu, fv)):
        torch.testing.assert_close(got[0], ref_u, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], ref_v, rtol=1e-4, atol=1e-5)
    _, config = lf.lora_init(net, k)
    assert config["text"]["activation"] == ("quick_gelu" if custom_text else "gelu")


def test_unsupported_splits_are_refused_in_one_line():
    cfg = tiny_config(embed_dim=16, vision_width=32, vision_layers=1, text_layers=1)
    net = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    with pytest.raises(FeatureCacheError, match=r"--cache-blocks 2: the image tower has 1 blocks"):
        lf.check(net, 2)
    with pytest.raises(ValueError, match=r"cache_features must be None or one of"):
        ecif.embed([], "nowhere", cache_features="lora2")
