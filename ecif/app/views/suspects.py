"""Suspects: filter, sort and page through the audit; export or mark the chosen ids."""

from pathlib import Path

import numpy as np
import streamlit as st

from ecif.app import state, support

table, info = state.audit()
folder = state.folder()
reviewed = state.reviewed(folder)
id_name = info.get("id_column") or "id"

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
    sort_by = c[1].selectbox("Sort by", [s for s in support.SORTABLE if s in table], key="sort")
    descending = c[2].toggle("Descending", value=sort_by != "rank", key="descending")

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
cols = ["image", "id", "caption", "misalign_score", "influence", "influence_pos"]
cols += ["influence_neg", "clip_score", "rank", "flag", "reviewed", "status"]
event = st.dataframe(
    shown[[c for c in cols if c in shown]],
    hide_index=True,
    key="suspects_table",
    on_select="rerun",
    selection_mode="multi-row",
    row_height=68,
    height=min(len(ids), 10) * 68 + 40,
    column_config={
        "image": st.column_config.ImageColumn("image", width="small"),
        "id": st.column_config.TextColumn(id_name),
        "caption": st.column_config.TextColumn("caption", width="medium"),
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
caps = [f"#{int(r)} · {str(t)[:60]}" for r, t in zip(view["rank"], view["caption"], strict=True)]
good = [(t, cap) for t, cap in zip(thumbs, caps, strict=True) if t is not None]
if good:
    st.image([t for t, _ in good], caption=[cap for _, cap in good], width=128)
