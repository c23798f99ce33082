"""Suspects: filter, sort and page through the audit; export or mark the chosen ids."""

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from ecif.app import state, support
from ecif.audit.folder import influence_columns

table, info = state.audit()
folder = state.folder()
reviewed = state.reviewed(folder)
id_name = "id"  # exports and tables say id; the input's own column name is shown beside it
source_id = info.get("source_id_column") or info.get("id_column") or "id"
ROW_HEIGHT = 60


def _follow_sort() -> None:
    """The direction follows the column: most suspicious first for each."""
    by = st.session_state["sort"]
    st.session_state["descending"] = support.SUSPICIOUS_FIRST_DESCENDING.get(by, True)


st.title("Suspects")
with st.expander("Filter and sort", expanded=True):
    c = st.columns([1, 1, 2, 1, 1])
    flagged_only = c[0].checkbox("Flagged only", value=False, key="flagged_only")
    status = c[1].selectbox("Status", ["ok", "failed", "all"], key="status")
    text = c[2].text_input("Caption contains", key="caption_filter")
    review = c[3].selectbox("Review", ["all", "unreviewed", "reviewed"], key="review")
    page_size = c[4].selectbox("Rows per page", [25, 50, 100, 200], index=1, key="page_size")
    c = st.columns([2, 1, 1])
    scores = table["misalign_score"].to_numpy(np.float64)
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    min_score = c[0].slider(
        "Minimum misalign_score", lo, max(hi, lo + 1e-9), lo, key="min_score", format="%.4g"
    )
    sort_by = c[1].selectbox(
        "Sort by",
        [s for s in support.SORTABLE if s in table],
        key="sort",
        on_change=_follow_sort,
        help="the direction switches to most suspicious first for each column",
    )
    if "descending" not in st.session_state:
        st.session_state["descending"] = support.SUSPICIOUS_FIRST_DESCENDING.get(sort_by, True)
    descending = c[2].toggle("Descending", key="descending")

f = support.Filters(
    flagged_only=flagged_only,
    min_score=min_score if min_score > lo else None,
    text=text,
    status=status,
    review=review,
)
rows = support.filter_table(table, f, reviewed["id"])
pages = support.num_pages(len(rows), page_size)
st.markdown(f"**{len(rows):,}** of {len(table):,} pairs match · {pages:,} page(s)")
if rows.empty:
    st.info("No pair matches these filters.")
    st.stop()
page = st.columns([1, 4])[0].number_input("Page", 1, pages, 1, step=1)
view = support.sort_page(rows, sort_by, not descending, int(page), page_size)
ids = view["id"].tolist()
thumbs, problems = state.thumbnails(info, ids, size=128)
for p in problems:
    st.warning(f"Images: {p}")
shown = view.assign(
    image=[support.data_uri(t) for t in thumbs],
    reviewed=view["id"].isin(reviewed["id"]).to_numpy(),
)
cols = ["image", "rank", "id", "caption", "misalign_score", *influence_columns(view)]
cols += ["clip_score", "is_misaligned", "reviewed"]
if status != "ok":  # only then can a row be anything but ok
    cols += ["status", "error_message"]


def _num(label: str, name: str, width: int):
    return st.column_config.NumberColumn(label, format="%.3g", width=width, help=name)


event = st.dataframe(  # narrow columns with short labels: all of them fit a 1400 px window
    shown[[c for c in cols if c in shown]],
    hide_index=True,
    key="suspects_table",
    on_select="rerun",
    selection_mode="multi-row",
    row_height=ROW_HEIGHT,
    height=(len(ids) + 1) * ROW_HEIGHT + 3,  # every row of the page, no inner scrolling
    width="stretch",
    column_config={
        "image": st.column_config.ImageColumn("image", width=56),
        "rank": st.column_config.NumberColumn("rank", format="%d", width=50),
        "id": st.column_config.TextColumn("id", width=120, help=f"the input's {source_id!r}"),
        "caption": st.column_config.TextColumn("caption", width=180),
        "misalign_score": _num("misalign", "misalign_score: higher = more suspicious", 80),
        "influence": _num("influence", "influence: negative = removing it helps", 80),
        "influence_pos": _num("pos", "influence_pos: the pair's own match term", 72),
        "influence_neg": _num("neg", "influence_neg: its role as a negative", 72),
        "self_influence": _num(
            "self-infl.", "self_influence: how hard the fit strains for the pair", 80
        ),
        "clip_score": _num("clip", "clip_score: cosine of the raw embeddings", 62),
        "is_misaligned": st.column_config.CheckboxColumn("flagged", width=60),
        "reviewed": st.column_config.CheckboxColumn("reviewed", width=72),
        "status": st.column_config.TextColumn("status", width=60),
        "error_message": st.column_config.TextColumn("error", width=160),
    },
)
picked = [ids[i] for i in (event.selection.rows if event else []) if i < len(ids)]
extra = st.multiselect("Also select by id (this page)", ids, key="select_ids")
selected = list(dict.fromkeys(picked + extra))

st.subheader("Selected pairs")
c = st.columns([2, 1, 1, 1, 1])
scope = c[0].radio(
    "Which ids",
    [f"selected ({len(selected)})", f"all filtered ({len(rows):,})"],
    key="scope",
    horizontal=True,
)
chosen = selected if scope.startswith("selected") else rows["id"].tolist()
fmt = c[1].radio("Format", ["csv", "parquet"], key="fmt", horizontal=True)
c[2].download_button(
    "Download ids",
    support.ids_bytes(chosen, fmt, id_name),
    file_name=f"ecif_ids.{fmt}",
    disabled=not chosen,
)
if c[3].button("Write to audit folder", disabled=not chosen, key="export"):
    path = support.export_ids(folder, chosen, fmt, id_name)
    st.success(f"Wrote {len(chosen):,} ids to {path}")
if c[4].button("Mark reviewed", disabled=not chosen, key="mark"):
    n = support.mark_reviewed(folder, chosen)
    st.success(f"Marked {n:,} new pair(s) as reviewed (kept in {support.REVIEWED_FILE}).")

c = st.columns([3, 1])
target = c[0].selectbox("Open a pair from this page", ids, key="open_id")
if c[1].button("Open in Pair detail", key="open"):
    st.session_state["pair_id"] = target
    st.session_state["pair_id_input"] = str(target)
    st.switch_page(Path(__file__).with_name("pair.py"))

st.subheader("This page's images")
caps = [
    f"#{int(r) if pd.notna(r) else '-'} · {str(t)[:60]}"
    for r, t in zip(view["rank"], view["caption"], strict=True)
]
good = [(t, cap) for t, cap in zip(thumbs, caps, strict=True) if t is not None]
if good:
    st.image([t for t, _ in good], caption=[cap for _, cap in good], width=128)
