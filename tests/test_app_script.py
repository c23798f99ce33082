"""``streamlit run app/streamlit_app.py -- AUDIT``: the top-level entry file opens the app."""

import sys
from pathlib import Path

from streamlit.testing.v1 import AppTest

from ecif.app import support

SCRIPT = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"


def test_top_level_script_renders_the_overview_of_the_audit_after_dashes(monkeypatch, small_audit):
    # the folder comes from the argument after `--` (what `streamlit run` leaves in argv)
    monkeypatch.delenv(support.AUDIT_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(small_audit)])
    at = AppTest.from_file(str(SCRIPT), default_timeout=90)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error
    table, _ = support.load_audit(small_audit)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Pairs"] == f"{len(table):,}" == "240"
    assert at.title[0].value == "Audit overview"
    assert at.sidebar.text_input[0].value == str(small_audit)
