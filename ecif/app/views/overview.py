"""Overview: what was audited, how many pairs are flagged, and how the scores spread.

Charts are Vega-Lite specs given as dicts (no Altair import or schema validation on the way:
the page's charts appear with the rest of it).
"""

import numpy as np
import pandas as pd
import streamlit as st

from ecif.app import charts, state
from ecif.audit.folder import influence_columns
from ecif.audit.selection import describe_fit

table, info = state.audit()


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
fitted = describe_fit(info)
if fitted:  # the head's search, or a model mode's part: what the influence was taken through
    st.markdown(f"**{fitted[0].capitalize()}:** {fitted[1]}")
if info.get("combination"):
    from ecif.audit.combination_text import describe_combination

    st.markdown(f"**misalign_score:** {describe_combination(info['combination'])}")
for note in state.audit_warnings(info):
    st.warning(note)
if ok.empty:
    st.warning("No pair was scored successfully; see the Suspects page with status 'failed'.")
    st.stop()
shown = influence_columns(ok)  # self-influence when no validation set was scored
signal = shown[0] if shown else "influence"
cols = ["id", "misalign_score", *shown, "clip_score"]
cols += ["pair_loss", "trusted_loss", "knn_disagreement", "flag"]
pts = sample(ok[[c for c in cols if c in ok]])
st.subheader("misalign_score")
scores = ok["misalign_score"].to_numpy(np.float64)
cut = charts.threshold_cut(ok)
hist = charts.histogram(scores, cut)
st.vega_lite_chart(hist, charts.histogram_spec(cut, int(ok["is_misaligned"].sum())), key="hist")
if cut is None:
    st.caption("No pair is flagged, so there is no threshold line.")
left, right = st.columns(2)
with left:
    st.subheader("Positive vs negative influence")
    if {"influence_pos", "influence_neg"} <= set(pts):
        st.vega_lite_chart(pts, charts.scatter_spec("influence_pos", "influence_neg"))
    elif shown == ["self_influence"]:
        st.caption("Scored by self-influence (no validation set): no positive/negative split.")
with right:
    st.subheader(f"CLIP score vs {signal.replace('_', '-')}")
    if {"clip_score", signal} <= set(pts):
        st.vega_lite_chart(pts, charts.scatter_spec("clip_score", signal))
if len(ok) > len(pts):
    st.caption(f"Scatter plots show a random sample of {len(pts):,} of {len(ok):,} pairs.")
