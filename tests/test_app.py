"""The Streamlit app through streamlit.testing.v1.AppTest on a small real audit."""

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from ecif.app import APP_SCRIPT, support

TIMEOUT = 90


def app(monkeypatch, folder, page=None) -> AppTest:
    monkeypatch.setenv(support.AUDIT_ENV, str(folder))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT)
    at.run()
    if page:
        at.switch_page(f"views/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture
def audit_copy(small_audit, tmp_path):
    """A copy to write review marks and exports into (embeddings stay with the original)."""
    out = tmp_path / "audit"
    shutil.copytree(small_audit, out, ignore=shutil.ignore_patterns("data", "embeddings"))
    return out


def shown_table(at: AppTest, key: str | int = "suspects_table") -> pd.DataFrame:
    """A table by key (selectable tables) or by position on the page."""
    if isinstance(key, int):
        return at.dataframe[key].value
    return next(d for d in at.dataframe if d.key == key).value


def test_overview_shows_counts_and_charts(monkeypatch, small_audit):
    at = app(monkeypatch, small_audit)
    metrics = {m.label: m.value for m in at.metric}
    table, _ = support.load_audit(small_audit)
    assert metrics["Pairs"] == f"{len(table):,}"
    assert metrics["Flagged"] == f"{int(table['is_misaligned'].sum()):,}"
    assert metrics["Method"] == "ecif"
    assert len(at.get("arrow_vega_lite_chart")) == 3 or len(at.get("vega_lite_chart")) == 3
    assert not at.error
    # what the audit chose, from audit.json: the head's scale and pull, and how misalign_score
    # combined its signals
    info = json.loads((small_audit / "audit.json").read_text())
    text = " ".join(m.value for m in at.markdown)
    assert f"logit scale {info['head_choice']['logit_scale']:.3g}" in text
    assert "misalign_score:** log-odds of the suspect component" in text


def test_suspects_filters_sort_and_pages(monkeypatch, small_audit):
    at = app(monkeypatch, small_audit, "suspects")
    table, _ = support.load_audit(small_audit)
    first = shown_table(at)
    assert len(first) == 50 and first["caption"].notna().all()
    assert list(first["id"]) == list(table.sort_values("rank")["id"][:50])  # rank ascending
    assert first["image"].str.startswith("data:image/png;base64,").all()  # thumbnails on screen
    at.text_input(key="caption_filter").set_value("triangle").run()
    df = shown_table(at)
    want = table[table["caption"].str.contains("triangle")]
    assert len(df) == min(50, len(want)) and df["caption"].str.contains("triangle").all()
    assert f"**{len(want):,}** of" in at.markdown[0].value or any(
        f"**{len(want):,}** of" in m.value for m in at.markdown
    )
    at.selectbox(key="sort").set_value("clip_score").run()
    at.toggle(key="descending").set_value(False).run()
    df = shown_table(at)
    assert np.all(np.diff(df["clip_score"].to_numpy()) >= 0)
    at.text_input(key="caption_filter").set_value("no such caption at all").run()
    assert any("No pair matches" in i.value for i in at.info)
    at.text_input(key="caption_filter").set_value("").run()
    at.number_input[0].set_value(5).run()  # last page: 240 rows, 50 per page
    assert len(shown_table(at)) == len(table) - 4 * 50
    assert len(at.image) >= 1 and not at.warning


def test_suspects_export_and_mark_reviewed(monkeypatch, audit_copy):
    at = app(monkeypatch, audit_copy, "suspects")
    ids = list(shown_table(at)["id"][:3])
    at.multiselect(key="select_ids").set_value(ids).run()
    at.radio(key="fmt").set_value("parquet").run()
    at.button(key="export").click().run()
    files = list((audit_copy / "exports").glob("selected_ids_*.parquet"))
    assert len(files) == 1 and pd.read_parquet(files[0])["id"].tolist() == ids
    assert any("Wrote 3 ids" in s.value for s in at.success)
    at.button(key="mark").click().run()
    assert support.read_reviewed(audit_copy)["id"].tolist() == ids
    at.selectbox(key="review").set_value("unreviewed").run()
    assert not set(ids) & set(shown_table(at)["id"])
    at.selectbox(key="review").set_value("reviewed").run()
    df = shown_table(at)
    assert sorted(df["id"]) == sorted(ids) and df["reviewed"].all()
    at.radio(key="scope").set_value(at.radio(key="scope").options[1]).run()  # all filtered
    at.radio(key="fmt").set_value("csv").run()
    at.button(key="export").click().run()
    csv = sorted((audit_copy / "exports").glob("selected_ids_*.csv"))
    assert sorted(pd.read_csv(csv[-1])["id"]) == sorted(ids)


def test_table_row_selection_exports_those_rows(monkeypatch, audit_copy):
    at = app(monkeypatch, audit_copy, "suspects")
    ids = list(shown_table(at)["id"])
    at.session_state["suspects_table"] = {"selection": {"rows": [1, 4], "columns": []}}
    at.run()
    at.button(key="export").click().run()
    out = next((audit_copy / "exports").glob("selected_ids_*.csv"))
    assert pd.read_csv(out)["id"].tolist() == [ids[1], ids[4]]


def test_pair_detail_shows_terms_neighbours_and_batch(monkeypatch, small_audit):
    at = app(monkeypatch, small_audit, "pair")
    table, _ = support.load_audit(small_audit)
    pid = table.sort_values("rank")["id"].iloc[7]
    at.text_input(key="pair_id_input").set_value(pid).run()  # [0] is the sidebar's audit folder
    assert not at.exception and not at.error
    cap = table.set_index("id").loc[pid, "caption"]
    assert any(cap in m.value for m in at.markdown)
    labels = {m.label for m in at.metric}
    assert {"influence", "influence_pos", "influence_neg", "misalign_score"} <= labels
    assert len(at.image) == 1
    nb = shown_table(at, 0)
    assert len(nb) == 16 and pid not in set(nb["id"]) and set(nb["by"]) == {"image", "caption"}
    batch = shown_table(at, 1)
    assert 0 < len(batch) <= 10 and "share" in batch
    at.text_input(key="pair_id_input").set_value("no-such-id").run()
    assert any("No pair with id" in e.value for e in at.error)


def test_suspects_open_in_pair_detail(monkeypatch, small_audit):
    at = app(monkeypatch, small_audit, "suspects")
    pid = shown_table(at)["id"].iloc[3]
    at.selectbox(key="open_id").set_value(pid).run()
    at.button(key="open").click().run()
    assert at.title[0].value == "Pair detail" and at.text_input(key="pair_id_input").value == pid


def _lists(at: AppTest) -> dict:
    return {"responsible": shown_table(at, 0), "helped": shown_table(at, 1)}


def test_trace_back_by_test_pair_caption_and_image(monkeypatch, small_audit):
    at = app(monkeypatch, small_audit, "trace")
    assert at.text_input(key="trace_test").value.endswith("val")
    at.slider(key="trace_k").set_value(5).run()
    at.button(key="trace_go").click().run()
    assert not at.error, [e.value for e in at.error]
    titles = [s.value for s in at.subheader]
    assert any(t.startswith("Responsible") for t in titles)
    assert any(t.startswith("Helped") for t in titles)
    lists = _lists(at)
    assert all(len(v) <= 5 for v in lists.values()) and sum(len(v) for v in lists.values()) > 0
    if len(lists["responsible"]):
        assert (lists["responsible"]["relative_influence"] < 0).all()
    if len(lists["helped"]):
        assert (lists["helped"]["relative_influence"] > 0).all()

    at.radio(key="trace_kind").set_value("A typed caption").run()
    at.text_input(key="trace_caption").set_value(
        "a large red circle in the center, white background"
    )
    at.button(key="trace_go").click().run()
    assert not at.error, [e.value for e in at.error]
    assert "circle" in at.markdown[-1].value or any("circle" in m.value for m in at.markdown)

    at.radio(key="trace_kind").set_value("An uploaded image").run()
    shard = sorted((small_audit / "data" / "train").glob("*.parquet"))[0]
    row = pd.read_parquet(shard).iloc[0]
    at.file_uploader(key="trace_upload").set_value(("q.jpg", row["jpg"], "image/jpeg")).run()
    at.button(key="trace_go").click().run()
    assert any("caption this image should match" in e.value for e in at.error)
    at.text_input(key="trace_image_caption").set_value(row["caption"])
    at.button(key="trace_go").click().run()
    assert not at.error, [e.value for e in at.error]
    assert sum(len(v) for v in _lists(at).values()) > 0


def test_errors_show_messages_not_tracebacks(monkeypatch, tmp_path, small_audit):
    for page in (None, "suspects", "pair", "trace"):
        at = app(monkeypatch, tmp_path, page)
        assert any("not an audit folder" in e.value for e in at.error)
    at = app(monkeypatch, tmp_path / "missing")
    assert any("no such folder" in e.value for e in at.error)
    empty = tmp_path / "empty"
    table, info = support.load_audit(small_audit)
    from ecif.audit import write_audit

    write_audit(empty, table.drop(columns="flag").iloc[:0], info)
    at = app(monkeypatch, empty, "suspects")
    assert any("no rows" in e.value for e in at.error)


def test_missing_images_are_named(monkeypatch, small_audit, tmp_path):
    out = tmp_path / "audit"
    shutil.copytree(small_audit, out, ignore=shutil.ignore_patterns("data"))
    man_p = out / "embeddings" / "train" / "manifest.json"
    man = json.loads(man_p.read_text())
    for p in man["parts"]:
        p["source"] = str(tmp_path / "gone" / Path(p["source"]).name)
    man_p.write_text(json.dumps(man))
    desc = json.loads((out / "audit.json").read_text())
    desc["embeddings"] = str(out / "embeddings" / "train")
    (out / "audit.json").write_text(json.dumps(desc))
    at = app(monkeypatch, out, "suspects")
    assert any("image shard not found" in w.value for w in at.warning)
    assert len(shown_table(at)) == 50  # the table still works
    at = app(monkeypatch, out, "pair")
    assert any("cannot be shown" in e.value for e in at.error)


def test_filter_and_page_are_fast_on_100k_rows():
    g = np.random.default_rng(0)
    n = 100_000
    table = pd.DataFrame(
        {
            "id": np.arange(n),
            "caption": np.where(g.random(n) < 0.5, "a red cube", "a blue ball"),
            "misalign_score": g.standard_normal(n).astype(np.float32),
            "is_misaligned": g.random(n) < 0.1,
            "status": "ok",
            "rank": np.arange(1, n + 1),
        }
    )
    reviewed = pd.Index(np.arange(0, n, 7))
    t = time.perf_counter()
    f = support.Filters(flagged_only=True, min_score=0.0, text="red", review="unreviewed")
    rows = support.filter_table(table, f, reviewed)
    page = support.sort_page(rows, "misalign_score", False, 2, 50)
    assert time.perf_counter() - t < 1.0
    want = table[
        table.is_misaligned
        & (table.misalign_score >= 0)
        & table.caption.str.contains("red")
        & ~table.id.isin(reviewed)
    ]
    assert len(rows) == len(want)
    expect = want.sort_values("misalign_score", ascending=False, kind="stable")["id"]
    assert set(page["id"]) == set(expect.iloc[50:100])


def test_ids_bytes_round_trip():
    assert support.ids_bytes(["a", "b"], "csv", "key") == b"key\na\nb\n"
    back = pd.read_parquet(io.BytesIO(support.ids_bytes([3, 4], "parquet")))
    assert back["id"].tolist() == [3, 4]


def test_cli_app_command_and_bad_folder(tmp_path, capsys):
    from ecif.cli import main
    from ecif.cli.app import streamlit_command

    cmd = streamlit_command(tmp_path, 9999)
    joined = " ".join(cmd)
    assert "--server.address 127.0.0.1" in joined and "--server.port 9999" in joined
    assert "--server.headless true" in joined and "--browser.gatherUsageStats false" in joined
    assert cmd[-2:] == ["--", str(tmp_path)]
    assert main(["app", str(tmp_path)]) == 2
    assert "not an audit folder" in capsys.readouterr().err


def test_cli_app_without_folder_builds_and_opens_the_demo(monkeypatch, tmp_path, small_audit):
    import os

    import ecif.audit.demo as demo
    from ecif.cli import main

    class Execed(Exception):
        pass

    def fake_execve(exe, cmd, env):
        ran.append((cmd, env))
        raise Execed

    def fake_demo(args):
        built.append(args.output)
        shutil.copytree(small_audit, args.output)

    built, ran = [], []
    monkeypatch.setattr(demo, "run_demo", fake_demo)
    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Execed):
        main(["app", "--port", "8765"])
    assert built == ["ecif-demo"] and (tmp_path / "ecif-demo" / "audit.json").exists()
    cmd, env = ran[0]
    assert cmd[-1] == str((tmp_path / "ecif-demo").resolve()) and "8765" in cmd
    assert env[support.AUDIT_ENV] == cmd[-1]


def test_overview_shows_what_the_engine_warned_of(monkeypatch, audit_copy):
    """An audit's recorded warnings on the overview, once each; an audit written before they
    were recorded still shows a fit that did not converge, from its fit report."""
    path = audit_copy / "audit.json"
    info = json.loads(path.read_text())
    note = "twin audit (weighs the signals, not the scores): head fit did not converge: x"
    info["warnings"] = [note]
    info["fit"] = [{**info["fit"][0], "converged": False, "grad_max": 2e-3, "tol": 1e-5}]
    path.write_text(json.dumps(info))
    shown = [w.value for w in app(monkeypatch, audit_copy).warning]
    assert shown == [note]  # the fit report's note is not said a second time
    info["warnings"] = []
    path.write_text(json.dumps(info))
    shown = [w.value for w in app(monkeypatch, audit_copy).warning]
    assert len(shown) == 1 and "did not converge (largest gradient 2.00e-03" in shown[0]
