"""Overview: what was audited, how many pairs are flagged, and how the scores spread."""

import numpy as np
import pandas as pd
import streamlit as st

from ecif.app import state

table, info = state.audit()


@st.cache_data(show_spinner=False, max_entries=4)
def histogram(values: np.ndarray, bins: int = 50) -> pd.DataFrame:
    v = values[np.isfinite(values)]
    counts, edges = np.histogram(v, bins=bins) if len(v) else (np.zeros(0), np.zeros(1))
    centers = np.round((edges[:-1] + edges[1:]) / 2, 3)  # short axis labels
    return pd.DataFrame({"misalign_score": centers, "pairs": counts})


@st.cache_data(show_spinner=False, max_entries=4)
def sample(df: pd.DataFrame, n: int = 5000) -> pd.DataFrame:
    """At most n points for the scatter plots (charts of 100k points make the page crawl)."""
    return df.sample(n, random_state=0) if len(df) > n else df


st.title("Audit overview")
st.caption(f"`{state.folder()}`")
ok = table[table["status"].astype(str) == "ok"]
c = st.columns(4)
c[0].metric("Pairs", f"{len(table):,}", help=f"{len(ok):,} scored, {len(table) - len(ok):,} failed")
c[1].metric("Flagged", f"{int(table['is_misaligned'].sum()):,}")
rate = table["is_misaligned"].mean()
c[2].metric("Flag rate", f"{rate:.1%}")
c[3].metric("Method", str(info.get("method", "?")))
st.markdown(
    f"**Model:** `{info.get('model', '?')}`  \n"
    f"**Validation:** {info.get('validation', 'none')}  \n"
    f"**Threshold:** {info.get('threshold', '?')}"
)
if ok.empty:
    st.warning("No pair was scored successfully; see the Suspects page with status 'failed'.")
    st.stop()
cols = ["misalign_score", "influence", "influence_pos", "influence_neg", "clip_score", "flag"]
pts = sample(ok[[c for c in cols if c in ok]])
st.subheader("misalign_score")
st.bar_chart(histogram(ok["misalign_score"].to_numpy(np.float64)), x="misalign_score", y="pairs")
left, right = st.columns(2)
with left:
    st.subheader("Positive vs negative influence")
    if {"influence_pos", "influence_neg"} <= set(pts):
        st.scatter_chart(pts, x="influence_pos", y="influence_neg", color="flag", size=12)
with right:
    st.subheader("CLIP score vs influence")
    if {"clip_score", "influence"} <= set(pts):
        st.scatter_chart(pts, x="clip_score", y="influence", color="flag", size=12)
if len(ok) > len(pts):
    st.caption(f"Scatter plots show a random sample of {len(pts):,} of {len(ok):,} pairs.")
