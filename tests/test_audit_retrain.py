"""The retraining harness: deterministic, honours the keep mask, metrics match brute force;
`ecif clean --retrain-model` on a small shapes audit."""

import numpy as np
import pandas as pd
import pytest
import torch

import ecif
from ecif.audit.retrain import (
    RetrainConfig,
    evaluate,
    labels_from_captions,
    retrain,
    retrain_and_evaluate,
)
from ecif.data.pair_images import load_pair_images, square_uint8

CFG = RetrainConfig(steps=4, batch_size=16)


@pytest.fixture(scope="module")
def pairs():
    return ecif.datasets.shapes(n=48, seed=2, noise=0.25), ecif.datasets.shapes(n=30, seed=9)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("regime", ["finetune", "scratch"])
def test_retrain_is_deterministic_and_seeded(pairs, tiny_clip_dir, regime):
    train, held = pairs
    kw = dict(model=tiny_clip_dir, regime=regime)
    a, tok = retrain(train.images, train.captions, config=CFG, **kw)
    b, _ = retrain(train.images, train.captions, config=CFG, **kw)
    assert _same(a, b)
    assert evaluate(a, tok, held.images, held.captions) == evaluate(
        b, tok, held.images, held.captions
    )
    c, _ = retrain(
        train.images, train.captions, config=RetrainConfig(steps=4, batch_size=16, seed=1), **kw
    )
    assert not _same(a, c)
    base, _ = ecif.audit.retrain.create(tiny_clip_dir, regime)
    assert not _same(a, base)  # it did train


def test_device_auto_is_the_cpu_here_and_a_missing_gpu_is_a_clear_error(pairs, tiny_clip_dir):
    train, _ = pairs
    a, _ = retrain(train.images, train.captions, model=tiny_clip_dir, config=CFG)
    auto = RetrainConfig(steps=4, batch_size=16, device="auto")
    b, _ = retrain(train.images, train.captions, model=tiny_clip_dir, config=auto)
    if torch.cuda.is_available():  # auto trains on the GPU, not bit for bit the CPU
        assert next(b.parameters()).is_cuda
        return
    assert _same(a, b)
    with pytest.raises(ValueError, match="no CUDA device"):
        RetrainConfig(device="cuda").torch_device()
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        RetrainConfig(device="tpu").torch_device()


def test_keep_mask_is_the_same_as_training_on_the_kept_rows(pairs, tiny_clip_dir):
    train, _ = pairs
    keep = ~train.frame["is_corrupted"].to_numpy()
    a, _ = retrain(train.images, train.captions, keep, model=tiny_clip_dir, config=CFG)
    rows = np.nonzero(keep)[0]
    b, _ = retrain(
        train.images[rows], [train.captions[i] for i in rows], model=tiny_clip_dir, config=CFG
    )
    assert _same(a, b)


def test_metrics_match_brute_force(pairs, tiny_clip_dir):
    _, held = pairs
    net, tok = ecif.audit.retrain.create(tiny_clip_dir)
    caps = held.captions
    classes = ["circle", "square", "triangle", "cross"]
    got = evaluate(net, tok, held.images, caps, classes=classes, template="a {}")
    from ecif.data.tiny_clip import images_to_tensor

    with torch.no_grad():
        u = net.encode_image(images_to_tensor(held.images, 32), normalize=True).numpy()
        v = net.encode_text(tok(caps), normalize=True).numpy()
        p = net.encode_text(tok([f"a {c}" for c in classes]), normalize=True).numpy()
    truth = [classes.index(s) for s in held.frame["shape"]]
    assert got["zero_shot_acc"] == pytest.approx(np.mean((u @ p.T).argmax(1) == truth))
    s = u @ v.T  # (image, caption), duplicates included
    for k in (1, 5):
        i2t, t2i = [], []
        for i in range(len(caps)):
            texts, seen = [], set()  # the top k distinct caption texts for image i
            for j in np.argsort(-s[i], kind="stable"):
                if caps[j] not in seen:
                    seen.add(caps[j])
                    texts.append(caps[j])
            i2t.append(caps[i] in texts[:k])
            top = np.argsort(-s[:, i], kind="stable")[:k]  # images for caption i's text
            t2i.append(any(caps[j] == caps[i] for j in top))
        assert got[f"i2t_r@{k}"] == pytest.approx(np.mean(i2t))
        assert got[f"t2i_r@{k}"] == pytest.approx(np.mean(t2i))
    none = evaluate(net, tok, held.images, caps)  # no classes: the distinct captions
    assert none["zero_shot_acc"] == pytest.approx(none["i2t_r@1"])


def test_labels_from_captions():
    classes = ["cat", "black cat", "dog"]
    caps = ["a black cat", "a dog and a cat", "a catalogue", "a cat", "hot dog!"]
    assert labels_from_captions(caps, classes).tolist() == [1, -1, -1, 0, 2]


def test_retrain_and_evaluate_rows(pairs, tiny_clip_dir):
    train, held = pairs
    keeps = {"all": None, "clean": ~train.frame["is_corrupted"].to_numpy()}
    df = retrain_and_evaluate(
        train.images, train.captions, keeps, held.images, held.captions,
        model=tiny_clip_dir, regimes=("finetune", "scratch"), config=CFG,
    )  # fmt: skip
    assert list(df["kept_set"]) == ["all", "clean"] * 2
    assert list(df["kept"]) == [48, 36, 48, 36] and df["i2t_r@5"].between(0, 1).all()


def test_pair_images_line_up_with_the_embeddings(small_audit):
    emb = small_audit / "embeddings" / "train"
    ids, images, caps = load_pair_images(emb, 32)
    es = ecif.EmbeddingSet.load(emb)
    assert list(ids) == list(es.ids) and caps == list(es.metadata["caption"])
    data = ecif.datasets.shapes(n=240, seed=0, noise=0.2)  # what make_small_audit wrote
    row = data.frame["key"].tolist().index(ids[5])
    want = square_uint8(data.pil(row), 32).astype(int)
    assert images.shape == (240, 32, 32, 3) and np.abs(images[5].astype(int) - want).mean() < 4


def test_cli_clean_retrain_model(small_audit, tiny_clip_dir, tmp_path, capsys):
    from ecif.cli import main

    classes = tmp_path / "classes.txt"
    classes.write_text("circle\nsquare\ntriangle\ncross\n")
    argv = [
        "clean", str(small_audit), "--val", str(small_audit / "embeddings" / "val"),
        "--count", "30", "--quiet", "--retrain-model", f"local-dir:{tiny_clip_dir}",
        "--retrain-steps", "3", "--retrain-batch-size", "16", "--retrain-regime", "both",
        "--classes", str(classes), "--prompt", "a {}",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "retrained local-dir:" in out and "3 steps" in out
    lines = out.split("retrained", 1)[1].splitlines()[2:10]
    rows = [line.split() for line in lines]
    assert [r[0] for r in rows] == ["none", "drop", "drop", "drop"] * 2
    names = [" ".join(r[:3]) if r[0] == "none" else " ".join(r[:2]) for r in rows]
    assert names[:4] == ["none (all pairs)", "drop ecif", "drop random", "drop clip_score"]
    table = pd.DataFrame([r[-9:] for r in rows])  # regime, dropped, kept, metrics
    assert list(table[0]) == ["finetune"] * 4 + ["scratch"] * 4
    assert list(table[1].astype(int)) == [0, 30, 30, 30] * 2
    assert list(table[2].astype(int)) == [240, 210, 210, 210] * 2
    assert (table[4].astype(int) == 80).all()  # every validation caption names one shape


def test_cli_clean_retrain_without_images_is_a_one_line_error(small_audit, tmp_path, capsys):
    from ecif.cli import main

    val = ecif.EmbeddingSet.load(small_audit / "embeddings" / "val")
    val.save(tmp_path / "val")  # embeddings only: no input shards recorded
    argv = ["clean", str(small_audit), "--val", str(tmp_path / "val"), "--count", "30",
            "--quiet", "--retrain-model", "audit"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "records no input shard" in err


def test_prompt_ensemble_is_the_normalised_mean(tiny_clip_dir):
    from ecif.audit.retrain import class_prompts, create

    net, tok = create(tiny_clip_dir)
    templates = ["a small red {} on the left, white background", "a large blue {} at the top, black background"]  # fmt: skip
    got = class_prompts(net, tok, ["circle", "cross"], templates).numpy()
    with torch.no_grad():
        e = [net.encode_text(tok([t.format(c) for t in templates]), normalize=True).numpy().mean(0)
             for c in ("circle", "cross")]  # fmt: skip
    want = np.stack(e) / np.linalg.norm(np.stack(e), axis=1, keepdims=True)
    assert np.allclose(got, want, atol=1e-6)
    single = class_prompts(net, tok, ["circle"], "a {}").numpy()
    with torch.no_grad():
        ref = net.encode_text(tok(["a circle"]), normalize=True).numpy()
    assert np.allclose(single, ref, atol=1e-6)


def test_a_model_that_cannot_be_built_is_a_model_load_error(tmp_path):
    """`ecif clean --retrain-model /missing` printed open_clip's RuntimeError traceback; a
    ModelLoadError is one `error:` line on the command line."""
    from ecif.audit.retrain import create
    from ecif.cli.errors import is_user_error
    from ecif.data.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot build the model to retrain") as e:
        create(str(tmp_path / "missing"))
    assert is_user_error(e.value) and "Available" not in str(e.value)
