"""Trace-back on model-mode audits from an image file, free text and class prompts: the file's
rows are the cached rows of the same image, and real refits move the query's loss the way
the lists say."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import ecif
from ecif import datasets
from ecif.audit import model_queries as mq
from ecif.audit.model_trace_pair import query_inputs
from ecif.cli import main
from ecif.data.features import load_features
from ecif.engine.encoder_fit import fit_encoder
from ecif.engine.encoder_model import EncoderModel
from ecif.engine.model_trace import query_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _audit(root, tiny_clip_dir, kind, n_train, n_val, opts):
    model = f"local-dir:{tiny_clip_dir}"
    data = {}
    for name, n, noise, seed in (("train", n_train, 0.25, 0), ("val", n_val, 0.0, 1)):
        data[name] = datasets.shapes(n, seed=seed, noise=noise)
        data[name].to_parquet(root / f"{name}-shards", image_format="png")  # exact pixels
        ecif.embed(root / f"{name}-shards", root / name, model=model, cache_features=kind)
    audit = root / "audit"
    argv = ["score", str(root / "train"), "--val", str(root / "val"), "-o", str(audit)]
    assert main([*argv, "--params", kind, *opts, "--quiet"]) == 0
    return audit, data


@pytest.fixture(scope="module")
def projection(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("model-queries")
    audit, data = _audit(root, tiny_clip_dir, "projection", 160, 64, ["--batch-size", "32"])
    png = root / "query.png"
    Image.fromarray(data["val"].images[3]).save(png)
    return dict(root=root, audit=audit, data=data, png=png)


def _refit_signs(audit, q, table):
    """Drop each of the top three responsible / helped pairs in turn, refit (float64, warm
    start), and return the query's loss changes per list. (Three, not one: the part is not
    convex, so one pair's refit is a noisy draw; on a 2026-12 machine the top helped pair of
    the free-text query moved the loss by -0.025 where its four neighbours moved it by
    +0.016 to +0.245.)"""
    train = load_features(audit.parent / "train")
    state = torch.load(audit / "model.pt", weights_only=False)[0]
    model = fit_encoder(
        EncoderModel.from_state_dict(state).to(torch.float64), train.image, train.text
    )

    def loss(m):
        with torch.no_grad():
            return float(query_loss(m, q.query, q.candidates, q.positive, direction=q.direction))

    base = loss(model)
    ids = list(np.asarray(train.ids).astype(str))
    out = {}
    for name in ("responsible", "helped"):
        out[name] = []
        for pair_id in table.loc[table["list"] == name, "id"].head(3):
            r = ids.index(str(pair_id))
            refit = fit_encoder(model, train.image, train.text, init=model, exclude_positions=[r])
            out[name].append(loss(refit) - base)
    return out


def test_an_image_file_encodes_to_the_cached_rows_of_the_same_image(projection):
    inputs = query_inputs(projection["audit"])
    img_rows, txt_rows, _, _ = inputs.encoder.encode(
        images=[projection["png"]], texts=[projection["data"]["val"].captions[3]]
    )
    val = load_features(projection["root"] / "val")
    # the same image and caption went through `ecif embed --cache-features` as parquet bytes
    np.testing.assert_allclose(img_rows[0], val.image[3].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(txt_rows[0], val.text[3].astype(np.float32), atol=2e-3)


def test_trace_an_image_file_with_its_caption_in_projection_mode(projection, tmp_path, capsys):
    caption = projection["data"]["val"].captions[3]
    out_csv = tmp_path / "t.csv"
    argv = ["trace", str(projection["audit"]), "--image", str(projection["png"])]
    assert main([*argv, "--caption", caption, "-k", "3", "-o", str(out_csv)]) == 0
    said = capsys.readouterr().out
    assert f"{caption!r} against the image's" in said and "RESPONSIBLE" in said
    table = pd.read_csv(out_csv)
    assert (table.loc[table["list"] == "responsible", "relative_influence"] < 0).all()
    assert (table.loc[table["list"] == "helped", "relative_influence"] > 0).all()
    q = mq.image_query(query_inputs(projection["audit"]), projection["png"], caption=caption)
    assert q.positive[0] and q.positive.sum() == 1 and caption not in list(q.names[1:])
    # (image -> text refits are checked by test_audit_model_mode's --query-id trace)
    # the probe norms (the same for every query) are kept for the next query, and are what
    # a fresh probe estimate of the saved part gives (its solves to the probes' tolerance,
    # within 2% of solves to 1e-6)
    from ecif.engine.model_probes import PROBE_SOLVE_TOL, probe_estimate

    with np.load(projection["audit"] / "index" / "model_norms.npz") as cached:
        kept = cached["norms"]
    state = torch.load(projection["audit"] / "model.pt", weights_only=False)[0]
    train = load_features(projection["root"] / "train")
    model = EncoderModel.from_state_dict(state)
    fresh = probe_estimate(model, train, whiten=False, tol=PROBE_SOLVE_TOL).norms()
    np.testing.assert_allclose(kept, fresh, rtol=1e-6)
    tight = probe_estimate(model, train, whiten=False, tol=1e-6).norms()
    np.testing.assert_allclose(kept, tight, rtol=0.02)


def test_trace_free_text_in_projection_mode(projection, tmp_path, capsys):
    caption = projection["data"]["train"].captions[0]
    out_csv = tmp_path / "t.csv"
    argv = ["trace", str(projection["audit"]), "--caption", caption, "-k", "3"]
    assert main([*argv, "-o", str(out_csv)]) == 0
    said = capsys.readouterr().out
    assert "nearest training images" in said and "prediction: 'image of" in said
    q = mq.caption_query(query_inputs(projection["audit"]), caption)
    assert q.direction == "text->image" and q.positive.any() and not q.positive.all()
    # right answers are exactly the images whose training caption is the query's words
    assert q.positive.tolist() == [str(n).endswith(f"({caption})") for n in q.names]
    moved = _refit_signs(projection["audit"], q, pd.read_csv(out_csv))
    responsible, helped = np.array(moved["responsible"]), np.array(moved["helped"])
    assert len(responsible) == len(helped) == 3, moved
    # removing what the lists call responsible lowers the query's loss, removing what
    # helped raises it: in sum, and for at least two of each three
    assert responsible.sum() < 0 and (responsible < 0).sum() >= 2, moved
    assert helped.sum() > 0 and (helped > 0).sum() >= 2, moved


def test_zero_shot_queries_in_projection_mode(projection, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    shapes = ["a photo of a circle", "a photo of a square", "a photo of a triangle"]
    classes.write_text("\n".join(shapes))
    audit, val = str(projection["audit"]), str(projection["root"] / "val")
    qid = str(ecif.EmbeddingSet.load(val).ids[3])
    query = ["--query-id", qid, "--test", val, "--classes", str(classes), "--label", "1"]
    assert main(["trace", audit, *query, "-k", "2"]) == 0
    said = capsys.readouterr().out
    assert "against 3 class prompts (true: 'a photo of a square')" in said
    # the image file and the same test pair are the same query (the same cached row)
    inputs = query_inputs(projection["audit"])
    a = mq.image_query(inputs, projection["png"], classes=shapes, label=1)
    b = mq.pair_query(val, qid, inputs=inputs, classes=shapes, label=1)
    np.testing.assert_allclose(a.query, b.query, atol=2e-3)
    np.testing.assert_array_equal(a.candidates, b.candidates)
    # a bad query is one line, not a traceback
    assert main(["trace", audit, "--image", str(projection["png"])]) == 2
    err = capsys.readouterr().err
    assert "--caption" in err and "Traceback" not in err


def test_index_keeps_a_model_audits_probe_norms_for_its_traces(projection, tmp_path, capsys):
    import shutil

    audit = tmp_path / "audit"
    shutil.copytree(projection["audit"], audit, ignore=shutil.ignore_patterns("index"))
    assert main(["index", str(audit), "--norms", "exact"]) == 2
    assert "probe count" in capsys.readouterr().err
    assert main(["index", str(audit), "--norms", "4", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "probe norms of 160 pairs (4 probes, computed" in said, said
    path = audit / "index" / "model_norms.npz"
    with np.load(path) as kept:
        norms, probes = kept["norms"], int(kept["probes"])
    assert probes == 4 and not (audit / "index" / "image.faiss").exists()
    from ecif.engine.model_probes import PROBE_SOLVE_TOL, probe_estimate

    state = torch.load(audit / "model.pt", weights_only=False)[0]
    train = load_features(projection["root"] / "train")
    model = EncoderModel.from_state_dict(state)
    fresh = probe_estimate(model, train, probes=4, whiten=False, tol=PROBE_SOLVE_TOL)
    np.testing.assert_allclose(norms, fresh.norms(), rtol=1e-6)
    # a second index and a trace reuse them (the file is not rewritten)
    stamp = path.stat().st_mtime_ns
    assert main(["index", str(audit), "--quiet"]) == 0
    assert "(4 probes, kept already)" in capsys.readouterr().out
    caption = projection["data"]["train"].captions[0]
    assert main(["trace", str(audit), "--caption", caption, "-k", "2", "--quiet"]) == 0
    assert path.stat().st_mtime_ns == stamp


def test_trace_an_image_file_in_lora_mode(tmp_path, tiny_clip_dir, capsys):
    opts = ["--lora-rank", "2", "--batch-size", "20"]
    audit, data = _audit(tmp_path, tiny_clip_dir, "lora", 40, 16, opts)
    png = tmp_path / "q.png"
    Image.fromarray(data["val"].images[2]).save(png)
    inputs = query_inputs(audit)
    rows, _, _, _ = inputs.encoder.encode(images=[png])
    val = load_features(tmp_path / "val")
    np.testing.assert_allclose(rows[0], val.image[2].astype(np.float32), atol=2e-3)
    caption = data["val"].captions[2]
    argv = ["trace", str(audit), "--image", str(png), "--caption", caption, "-k", "2"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "RESPONSIBLE" in said and "traced 1 query over 40 candidate pairs" in said


def test_app_traces_a_typed_caption_on_a_projection_audit(projection, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from ecif.app import APP_SCRIPT, support

    monkeypatch.setenv(support.AUDIT_ENV, str(projection["audit"]))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=120)
    at.run()
    at.switch_page("views/trace.py")
    at.run()
    at.radio(key="trace_kind").set_value("A typed caption")
    at.run()
    at.text_input(key="trace_caption").input(projection["data"]["train"].captions[0])
    at.run()
    at.button(key="trace_go").click()
    at.run(timeout=300)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any("nearest training images" in m.value for m in at.markdown)
    assert len(at.dataframe) == 2  # the two lists


def test_a_test_set_cached_for_another_part_is_one_error(projection, tiny_clip_dir, capsys):
    """A lora-cached test folder traced on a projection audit: a torch shape error before."""
    root = projection["root"]
    other = root / "lora-val"
    if not other.exists():
        model = f"local-dir:{tiny_clip_dir}"
        ecif.embed(root / "val-shards", other, model=model, cache_features="lora")
    qid = str(load_features(root / "val").ids[0])
    argv = ["trace", str(projection["audit"]), "--query-id", qid, "--test", str(other)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another trainable part (lora, 1 block(s)) than the audit's (projection)" in err
    assert "Traceback" not in err
    assert main([*argv[:4], "--test", str(root / "val"), "-k", "2", "--quiet"]) == 0


def test_model_trace_checks_counts_and_names_the_flags_it_ignores(projection, capsys):
    """-k -1 listed every pair but one in each list; head-mode flags were silently dropped."""
    root = projection["root"]
    qid = str(load_features(root / "val").ids[0])
    argv = ["trace", str(projection["audit"]), "--query-id", qid, "--test", str(root / "val")]
    assert main([*argv, "-k", "-1"]) == 2
    assert "k must be a whole number >= 0" in capsys.readouterr().err
    assert main([*argv, "-k", "2", "--candidates", "5", "--quiet"]) == 0
    said = capsys.readouterr()
    assert "note: --candidates only apply to head-mode audits; ignored" in said.err
    assert said.out.count("RESPONSIBLE") == 1


def test_app_pair_detail_on_a_model_audit_says_why_there_is_no_batch_split(projection, monkeypatch):
    """It said "no w.npy: the audit ran without a validation set" on an audit that had one."""
    from streamlit.testing.v1 import AppTest

    from ecif.app import APP_SCRIPT, support

    monkeypatch.setenv(support.AUDIT_ENV, str(projection["audit"]))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=120)
    at.run()
    at.switch_page("views/pair.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    said = [i.value for i in at.info]
    assert any("projection mode" in s and "head-mode audits only" in s for s in said)
    assert not any("without a validation set" in s for s in said)
