"""Entry script of the ecif app: `streamlit run ecif/app/main.py -- AUDIT_FOLDER`."""

from pathlib import Path

import streamlit as st

from ecif.app import state

# no page_icon / :material: icons: Streamlit fetches those from fonts.gstatic.com, and the app
# must not reach outside 127.0.0.1 (it runs offline)
st.set_page_config(page_title="ecif audit", layout="wide")

HERE = Path(__file__).parent
pages = [
    st.Page(HERE / "views" / "overview.py", title="Overview", default=True),
    st.Page(HERE / "views" / "suspects.py", title="Suspects"),
    st.Page(HERE / "views" / "pair.py", title="Pair detail"),
    st.Page(HERE / "views" / "trace.py", title="Trace-back"),
]
nav = st.navigation(pages)
if state.FOLDER_KEY not in st.session_state:
    st.session_state[state.FOLDER_KEY] = state.default_folder()
st.sidebar.text_input(
    "Audit folder", key=state.FOLDER_KEY, help="a folder written by `ecif demo` or `ecif score`"
)
if state.DATA_ROOT_KEY not in st.session_state:
    st.session_state[state.DATA_ROOT_KEY] = state.data_root()
st.sidebar.text_input(
    "Image data folder (if the inputs moved)",
    key=state.DATA_ROOT_KEY,
    help="thumbnails are read from the input shards named in the embeddings' manifest.json; "
    "if those moved, give the folder that holds them now (`ecif app --data-root`)",
)
nav.run()
