"""Pair detail: one pair's image and caption, its influence terms, neighbours and batch effects."""

import numpy as np
import pandas as pd
import streamlit as st

from ecif.app import detail, state, support
from ecif.audit.folder import AuditFolderError, influence_columns, params_of

table, info = state.audit()
folder = state.folder()

st.title("Pair detail")
top = table.sort_values("rank").iloc[0]["id"] if "rank" in table else table.iloc[0]["id"]
if "pair_id_input" not in st.session_state:  # the widget's state is dropped off this page
    st.session_state["pair_id_input"] = str(st.session_state.get("pair_id", top))
source_id = info.get("source_id_column") or info.get("id_column") or "id"
pid_text = st.text_input(f"Pair id (the input's {source_id!r})", key="pair_id_input")
by_str = table["id"].astype(str)
hit = np.nonzero((by_str == pid_text.strip()).to_numpy())[0]
if not len(hit):
    st.error(f"No pair with id {pid_text!r} in this audit.")
    st.stop()
pair = table.iloc[int(hit[0])]
st.session_state["pair_id"] = pair["id"]

left, right = st.columns([1, 2])
with left:
    thumbs, problems = state.thumbnails(info, [pair["id"]], size=512)
    if thumbs[0] is not None:
        st.image(thumbs[0], width=320)
    else:
        st.error("The image of this pair cannot be shown: " + "; ".join(problems or ["missing"]))
with right:
    st.markdown(f"**Caption:** {pair.get('caption', '')}")
    c = st.columns(3)
    c[0].metric("misalign_score", support.format_number(pair["misalign_score"]))
    c[1].metric("rank", f"{int(pair['rank']):,}" if pd.notna(pair["rank"]) else "-")
    c[2].metric("flagged", "yes" if pair["is_misaligned"] else "no")
    shown = influence_columns(pd.DataFrame([pair]))
    names = [n for n in (*shown, "clip_score") if n in pair]
    for row in (names[:2], names[2:]):  # two per row: wide enough for -4.56e-5
        c = st.columns(2)
        for col, name in zip(c, row, strict=False):
            col.metric(name, support.format_number(pair[name]), help=f"{float(pair[name])!r}")
    if shown == ["self_influence"]:
        st.caption(
            "self_influence = how far the fit would move to stop fitting this pair (no "
            "validation set to measure harm against): high for pairs the fit strains to match."
        )
    else:
        st.caption(
            "influence = predicted change of the validation loss if this pair is removed "
            "(negative: removing it helps, i.e. harmful). influence_pos comes from the pair's "
            "own match term, influence_neg from its role as a negative for the rest of its batch."
        )
    if pair.get("status", "ok") != "ok":
        st.warning(f"status {pair['status']}: {pair.get('error_message', '')}")

emb = info.get("embeddings")
if not emb:
    st.info("audit.json records no training embeddings: no neighbours or batch breakdown.")
    st.stop()
try:
    train = state.training_set(emb)
except Exception as e:
    st.error(f"Cannot load the training embeddings {emb}: {e}")
    st.stop()
try:
    row = int(train.positions([pair["id"]])[0])
except (KeyError, ValueError, IndexError):
    st.info("This pair is not in the training embeddings (failed rows are not embedded).")
    st.stop()


def show_rows(df, what: str) -> None:
    scored = table[table["status"] == "ok"] if "status" in table else table
    # an id may repeat as a failed row beside its scored one: the scored row's score
    scores = scored.drop_duplicates("id").set_index("id")["misalign_score"]
    df = df.assign(misalign_score=scores.reindex(df["id"]).to_numpy())
    caps = (
        train.metadata["caption"].to_numpy()[df["row"].to_numpy()]
        if "caption" in train.metadata
        else df["id"]
    )
    df = df.assign(caption=caps)
    thumbs, _ = state.thumbnails(info, df["id"].tolist(), size=96)
    df = df.assign(image=[support.data_uri(t) for t in thumbs])  # missing: a "no image" tile
    st.dataframe(
        df[["image"] + [c for c in df if c not in ("image", "row")]],
        hide_index=True,
        row_height=52,
        height=(len(df) + 1) * 52 + 4,
        column_config={"image": st.column_config.ImageColumn("image", width="small")},
        key=f"table_{what}",
    )


st.subheader("Nearest neighbours")
nb = detail.neighbours(train, row, k=8, indexes=state.indexes(folder))
show_rows(nb, "neighbours")
st.subheader("Batch members it affected most through the negative term")
if params_of(info) != "head":  # no head and no w.npy: the split is the head mode's
    st.info(
        f"This audit's influence runs through the model ({params_of(info)} mode): the split "
        "of influence_neg over batch members is computed for head-mode audits only."
    )
    st.stop()
st.caption(
    "share = this pair's contribution to influence_neg through each member: as a negative "
    "text for the member's image and as a negative image for the member's caption. The "
    "shares over the whole batch sum to influence_neg."
)
try:
    heads = state.heads(folder, support.audit_stamp(folder))
    members = detail.negative_members(folder, train, heads, row, k=10)
except (AuditFolderError, ValueError) as e:
    st.info(str(e))
else:
    show_rows(members, "batch")
