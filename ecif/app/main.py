"""Entry script of the ecif app: `streamlit run ecif/app/main.py -- AUDIT_FOLDER`."""

from pathlib import Path

import streamlit as st

from ecif.app import state

st.set_page_config(page_title="ecif audit", page_icon=":material/search:", layout="wide")

HERE = Path(__file__).parent
pages = [
    st.Page(
        HERE / "views" / "overview.py", title="Overview", icon=":material/bar_chart:", default=True
    ),
    st.Page(HERE / "views" / "suspects.py", title="Suspects", icon=":material/flag:"),
    st.Page(HERE / "views" / "pair.py", title="Pair detail", icon=":material/image_search:"),
    st.Page(HERE / "views" / "trace.py", title="Trace-back", icon=":material/account_tree:"),
]
nav = st.navigation(pages)
if state.FOLDER_KEY not in st.session_state:
    st.session_state[state.FOLDER_KEY] = state.default_folder()
st.sidebar.text_input(
    "Audit folder", key=state.FOLDER_KEY, help="a folder written by `ecif demo` or `ecif score`"
)
nav.run()
