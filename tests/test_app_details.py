"""The app's finer behaviour (AppTest): the threshold line, image placeholders, the sort
direction, number formats, the audit's own validation set, uploads and class prompts."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from ecif.app import detail, support
from ecif.audit.folder import read_parquet_meta, write_parquet_atomic
from tests.test_app import app, shown_table


@pytest.fixture
def flagged_audit(small_audit, tmp_path):
    """A copy whose top 24 pairs are flagged (the small audit's auto threshold flags none)."""
    out = tmp_path / "audit"
    shutil.copytree(small_audit, out, ignore=shutil.ignore_patterns("data", "embeddings"))
    for f in (out / "scores").glob("*.parquet"):
        df = pd.read_parquet(f)
        df["is_misaligned"] = df["rank"].fillna(10**9) <= 24
        write_parquet_atomic(f, df, read_parquet_meta(f))
    return out


@pytest.fixture
def whole_copy(small_audit, tmp_path):
    """A full copy (data and embeddings too) with audit.json pointing into it."""
    out = tmp_path / "whole"
    shutil.copytree(small_audit, out)
    info = json.loads((out / "audit.json").read_text())
    info["embeddings"] = str(out / "embeddings" / "train")
    info["validation_embeddings"] = str(out / "embeddings" / "val")
    (out / "audit.json").write_text(json.dumps(info))
    return out


def test_histogram_has_a_threshold_line_and_flat_labels(monkeypatch, flagged_audit):
    at = app(monkeypatch, flagged_audit)
    table, _ = support.load_audit(flagged_audit)
    cut = float(table.loc[table["is_misaligned"], "misalign_score"].min())
    spec = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    rules = [layer for layer in spec["layer"] if layer["mark"]["type"] == "rule"]
    assert len(rules) == 1 and rules[0]["data"]["values"][0]["threshold"] == pytest.approx(cut)
    assert "24 flagged" in rules[0]["data"]["values"][0]["label"]
    x = spec["layer"][0]["encoding"]["x"]
    assert x["type"] == "quantitative" and x["axis"]["labelAngle"] == 0


def _shards_gone(small_audit, tmp_path):
    """A copy whose manifest names input shards at paths that do not exist (moved data)."""
    out = tmp_path / "audit"
    shutil.copytree(small_audit, out, ignore=shutil.ignore_patterns("data"))
    desc = json.loads((out / "audit.json").read_text())
    desc["embeddings"] = str(out / "embeddings" / "train")
    (out / "audit.json").write_text(json.dumps(desc))
    man_p = out / "embeddings" / "train" / "manifest.json"
    man = json.loads(man_p.read_text())
    for p in man["parts"]:
        p["source"] = str(tmp_path / "gone" / "train" / p["source"].rsplit("/", 1)[-1])
    man["input_root"] = str(tmp_path / "gone" / "train")
    man_p.write_text(json.dumps(man))
    return out


def test_missing_thumbnails_are_a_tile_not_the_text_none(monkeypatch, small_audit, tmp_path):
    out = _shards_gone(small_audit, tmp_path)
    at = app(monkeypatch, out, "suspects")
    images = shown_table(at)["image"]
    assert (images == support.MISSING_IMAGE).all() and images.notna().all()
    assert any("--data-root" in w.value for w in at.warning)


def test_data_root_repoints_moved_input_shards(monkeypatch, small_audit, tmp_path):
    out = _shards_gone(small_audit, tmp_path)
    shutil.copytree(small_audit / "data" / "train", tmp_path / "moved")
    monkeypatch.setenv(support.DATA_ROOT_ENV, str(tmp_path / "moved"))
    at = app(monkeypatch, out, "suspects")
    assert shown_table(at)["image"].str.startswith("data:image/png;base64,").all()
    assert not at.warning
    # a data folder that does not hold them either: the warning names both places
    monkeypatch.setenv(support.DATA_ROOT_ENV, str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    at = app(monkeypatch, out, "suspects")
    said = " ".join(w.value for w in at.warning)
    assert str(tmp_path / "gone") in said and str(tmp_path / "elsewhere") in said, said


def test_sort_direction_follows_the_column(monkeypatch, small_audit):
    at = app(monkeypatch, small_audit, "suspects")
    assert at.toggle(key="descending").value is False  # rank: 1 first
    want = support.SUSPICIOUS_FIRST_DESCENDING
    for column in ("misalign_score", "clip_score", "influence", "misalign_score", "rank"):
        at.selectbox(key="sort").set_value(column).run()
        assert at.toggle(key="descending").value is want[column], column
        values = shown_table(at)[column].to_numpy(np.float64)
        steps = np.diff(values)
        assert (steps <= 0).all() if want[column] else (steps >= 0).all(), column
    table, _ = support.load_audit(small_audit)
    at.selectbox(key="sort").set_value("misalign_score").run()
    assert shown_table(at)["id"].iloc[0] == table.loc[table["misalign_score"].idxmax(), "id"]


def test_pair_detail_numbers_keep_their_digits(monkeypatch, small_audit):
    at = app(monkeypatch, small_audit, "pair")
    table, _ = support.load_audit(small_audit)
    pid = table.loc[table["influence_neg"].abs().idxmin(), "id"]  # the smallest magnitude
    at.text_input(key="pair_id_input").set_value(pid).run()
    pair = table.set_index("id").loc[pid]
    shown = {m.label: m.value for m in at.metric}
    for name in ("influence", "influence_pos", "influence_neg", "misalign_score"):
        assert len(shown[name]) <= 9, shown[name]
        assert float(shown[name]) == pytest.approx(float(pair[name]), rel=6e-3, abs=0), name
    assert support.format_number(-4.5678e-5) == "-4.57e-5"
    assert support.format_number(0.0123) == "0.0123" and support.format_number(-812.4) == "-812"


def test_trace_defaults_to_the_audits_own_validation_set(monkeypatch, whole_copy):
    emb = whole_copy / "embeddings"
    shutil.copytree(emb / "val", emb / "aaa-other-set")  # alphabetically first beside train
    info = json.loads((whole_copy / "audit.json").read_text())
    assert detail.test_folders(info)[0] == str(emb / "val")
    at = app(monkeypatch, whole_copy, "trace")
    assert at.text_input(key="trace_test").value == str(emb / "val")


def test_upload_is_named_by_its_file_and_class_prompts_work(monkeypatch, small_audit):
    at = app(monkeypatch, small_audit, "trace")
    at.radio(key="trace_kind").set_value("An uploaded image").run()
    shard = sorted((small_audit / "data" / "train").glob("*.parquet"))[0]
    row = pd.read_parquet(shard).iloc[0]
    at.file_uploader(key="trace_upload").set_value(("my-digit.jpg", row["jpg"], "image/jpeg"))
    at.run()
    at.text_input(key="trace_image_caption").set_value(row["caption"])
    at.button(key="trace_go").click().run()
    assert not at.error, [e.value for e in at.error]
    query = next(m.value for m in at.markdown if m.value.startswith("**Query:**"))
    assert "my-digit.jpg" in query and "ecif-app-uploads" not in query

    at.checkbox(key="trace_use_classes").check().run()
    prompts = ["a red circle", "a blue square", "a green triangle"]
    at.text_area(key="trace_classes").set_value("\n".join(prompts)).run()
    at.selectbox(key="trace_label").set_value("a blue square").run()
    at.button(key="trace_go").click().run()
    assert not at.error, [e.value for e in at.error]
    query = next(m.value for m in at.markdown if m.value.startswith("**Query:**"))
    assert "3 class prompts" in query and "'a blue square'" in query
    predicted = query.split("**Prediction:** ")[1]
    assert any(repr(p) in predicted for p in prompts)

    at.radio(key="trace_kind").set_value("A validation/test pair").run()
    at.button(key="trace_go").click().run()  # the prompts and class stay chosen
    assert not at.error, [e.value for e in at.error]
    query = next(m.value for m in at.markdown if m.value.startswith("**Query:**"))
    assert query.startswith("**Query:** test pair") and "3 class prompts" in query


def test_cli_app_data_root_reaches_the_app(monkeypatch, small_audit, tmp_path, capsys):
    import os

    from ecif.cli import main

    class Execed(Exception):
        pass

    def fake_execve(exe, cmd, env):
        ran.append(env)
        raise Execed

    ran = []
    monkeypatch.setattr(os, "execve", fake_execve)
    assert main(["app", str(small_audit), "--data-root", str(tmp_path / "nope")]) == 2
    said = capsys.readouterr()
    assert "--data-root" in said.err and not ran and "http://" not in said.out  # no server, no URL
    with pytest.raises(Execed):
        main(["app", str(small_audit), "--data-root", str(tmp_path)])
    assert ran[0][support.DATA_ROOT_ENV] == str(tmp_path.resolve())


def test_pair_detail_with_an_id_repeated_by_a_failed_row(monkeypatch, small_audit, tmp_path):
    """A duplicate input id stays as a failed row beside the scored one (documented); pair
    detail then failed on every pair (pandas cannot reindex on repeated labels)."""
    audit_copy = tmp_path / "audit"
    shutil.copytree(small_audit, audit_copy, ignore=shutil.ignore_patterns("data", "embeddings"))
    shard = sorted((audit_copy / "scores").glob("*.parquet"))[0]
    df = pd.read_parquet(shard)
    dup = df.iloc[[0]].assign(status="failed", error_message="duplicate id", rank=pd.NA)
    dup[["misalign_score", "influence"]] = np.nan
    write_parquet_atomic(shard, pd.concat([df, dup], ignore_index=True), read_parquet_meta(shard))
    at = app(monkeypatch, audit_copy, "pair")
    assert not at.exception, [e.value for e in at.exception]
    shown = {
        row["id"]: row["misalign_score"]
        for t in at.dataframe
        for _, row in t.value.iterrows()
        if "misalign_score" in t.value
    }
    full = pd.concat([pd.read_parquet(f) for f in (audit_copy / "scores").glob("*.parquet")])
    ok = full[full["status"] == "ok"].set_index("id")["misalign_score"]
    assert shown and all(np.isclose(v, ok[k], rtol=1e-6) for k, v in shown.items())


def test_trace_page_refuses_a_non_image_upload_and_an_unknown_typed_id(
    monkeypatch, small_audit, tmp_path
):
    at = app(monkeypatch, small_audit, "trace")
    at.radio(key="trace_kind").set_value("An uploaded image").run()
    at.file_uploader(key="trace_upload").set_value(("broken.png", b"not an image", "image/png"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("broken.png cannot be read as an image" in e.value for e in at.error)

    # more than 5,000 test pairs: the id is typed, not chosen from a list
    from ecif.data import layout

    width = ecif_width(small_audit)
    rng = np.random.default_rng(0)
    x, y = (
        v / np.linalg.norm(v, axis=1, keepdims=True) for v in rng.standard_normal((2, 5001, width))
    )
    meta = pd.DataFrame(
        {"key": [f"t{i}" for i in range(5001)], "caption": "a caption", "status": "ok"}
    )
    big = tmp_path / "big"
    layout.write_part(
        big, 0, x.astype(np.float32), y.astype(np.float32), meta, {"source": "0.parquet"}
    )
    layout.write_manifest(big, {"id_column": "key", "parts": [{"index": 0, "source": "0.parquet"}]})
    at.radio(key="trace_kind").set_value("A validation/test pair").run()
    at.text_input(key="trace_test").set_value(str(big)).run()
    at.text_input(key="trace_qid_text").set_value("no-such-id").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("No pair with id 'no-such-id'" in e.value for e in at.error)


def ecif_width(audit) -> int:
    from ecif.audit.folder import read_heads

    return int(read_heads(audit)[0].m.shape[0])


def test_unscored_rows_sort_last_in_either_direction():
    """Failed rows (NaN score, null rank) came above rank 1 when sorting most suspicious first."""
    table = pd.DataFrame(
        {
            "misalign_score": [0.5, np.nan, 2.0, -1.0],
            "rank": pd.array([2, pd.NA, 1, 3], dtype="Int64"),
        }
    )
    for by, want in (("misalign_score", [2, 0, 3, 1]), ("rank", [3, 0, 2, 1])):
        assert list(support.sort_page(table, by, False, 1, 10).index) == want
    assert list(support.sort_page(table, "rank", True, 1, 10).index) == [2, 0, 3, 1]


def test_switching_the_audit_drops_the_old_trace_and_test_folder(
    monkeypatch, small_audit, whole_copy
):
    at = app(monkeypatch, small_audit, "trace")
    at.button(key="trace_go").click().run()
    assert any(m.value.startswith("**Query:**") for m in at.markdown)
    at.text_input(key="audit_folder").set_value(str(whole_copy)).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not any(m.value.startswith("**Query:**") for m in at.markdown)  # small_audit's
    assert at.text_input(key="trace_test").value == str(whole_copy / "embeddings" / "val")
