"""Trace-back: which training pairs pushed the model towards a query's answer, which helped."""

import hashlib
import io
import tempfile
from pathlib import Path

import streamlit as st
from PIL import Image

from ecif.app import detail, state, support
from ecif.audit.folder import params_of
from ecif.audit.labels import check_class_prompts

table, info = state.audit()
folder = state.folder()

st.title("Trace-back")
st.caption(
    "A query becomes a test loss; candidate training pairs (nearest neighbours) are ranked by "
    "relative influence on it. **Responsible**: removing the pair would lower the query's "
    "loss, it pushed the model towards the wrong answer. **Helped**: removing it would raise "
    "the loss."
)
params = params_of(info)
if params != "head":  # through the encoders: test pairs from a feature cache, every pair ranked
    st.info(
        f"This audit's influence runs through the model ({params} mode): every training pair "
        "is ranked (norms from 32 random probes). A validation/test pair must come from a "
        "folder embedded with the same feature cache; uploaded images and typed text go "
        "through the frozen model named in the training feature cache."
    )
kinds = ["A validation/test pair", "An uploaded image", "A typed caption"]
kind = st.radio("Query", kinds, horizontal=True, key="trace_kind")
c = st.columns(2)
k = c[0].slider("Pairs per list", 1, 50, 10, key="trace_k")
candidates = (
    c[1].number_input("Candidates ranked (0 = every training pair)", 0, 1_000_000, 1000, step=100)
    if params == "head"
    else 0
)

query: dict = {}
if kind.startswith("A validation"):
    found = detail.test_folders(info)  # the audit's own validation set first
    if st.session_state.get("trace_test_of") != folder:  # another audit: its own set
        st.session_state["trace_test_of"] = folder
        st.session_state.pop("trace_test", None)
    test_path = st.text_input(
        "Validation/test embedding folder",
        value=found[0] if found else "",
        key="trace_test",
        help="default: the validation set this audit was scored against (audit.json)",
    )
    if test_path:
        try:
            test = state.test_set(test_path)
        except Exception as e:
            st.error(f"Cannot load {test_path}: {e}")
            st.stop()
        ids = list(test.ids)
        if len(ids) <= 5000:
            qid = st.selectbox("Pair", ids, key="trace_qid")
        else:
            typed = st.text_input("Pair id", value=str(ids[0]), key="trace_qid_text")
            qid = next((i for i in ids if str(i) == typed), None)
            if qid is None:
                st.error(f"No pair with id {typed!r} in {test_path}.")
                st.stop()
        if "caption" in (test.metadata if test.metadata is not None else {}):
            st.markdown(f"**Its caption:** {test.metadata['caption'].iloc[ids.index(qid)]}")
        query = dict(kind="pair", test=test, query_id=qid)
elif kind.startswith("An uploaded"):
    up = st.file_uploader("Image", type=["png", "jpg", "jpeg", "webp"], key="trace_upload")
    cap = st.text_input("The caption this image should match", key="trace_image_caption")
    if up is not None:
        data = up.getvalue()  # one file per distinct upload, not one per rerun
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception as e:  # a text file named .png, an empty or cut-off file
            st.error(f"{up.name} cannot be read as an image ({type(e).__name__}).")
            st.stop()
        st.image(data, width=160)
        tmp = Path(tempfile.gettempdir()) / "ecif-app-uploads"
        tmp.mkdir(exist_ok=True)
        tmp = tmp / f"{hashlib.sha1(data).hexdigest()[:16]}{Path(up.name).suffix}"
        if not tmp.exists():
            tmp.write_bytes(data)
        query = dict(kind="image", image_path=tmp, image_name=up.name, caption=cap)
else:
    cap = st.text_input("Caption", key="trace_caption")
    query = dict(kind="caption", caption=cap)

if query.get("kind") in ("pair", "image"):
    use_classes = st.checkbox(
        "Against class prompts (zero-shot) instead of captions",
        key="trace_use_classes",
        help="the query's image against these prompts; correct is the true class",
    )
    if use_classes:
        c = st.columns([3, 1])
        prompts = c[0].text_area(
            "Class prompts, one per line",
            key="trace_classes",
            placeholder="a photo of a circle\na photo of a square\na photo of a triangle",
        )
        names = [ln.strip() for ln in prompts.splitlines() if ln.strip()]
        if len(set(names)) < len(names):
            try:
                check_class_prompts(names, "class prompts")
            except ValueError as e:  # the selectbox would offer the repeat twice
                st.error(str(e))
                st.stop()
        true = c[1].selectbox("True class", names, key="trace_label") if names else None
        query.update(classes=names, label=names.index(true) if true is not None else None)

clicked = st.button("Trace", type="primary", disabled=not query, key="trace_go")
if clicked and params != "head":
    model_query = {key: v for key, v in query.items() if key != "test"}
    if query.get("kind") == "pair":
        model_query["test_path"] = test_path
    try:
        with st.spinner("Ranking every training pair through the model…"):
            result, qinfo = detail.run_model_trace(folder, k=k, **model_query)
    except Exception as e:  # bad query, missing feature cache: say why in the page
        st.error(f"Trace-back failed: {e}")
        st.stop()
    st.session_state["trace_result"] = (folder, result, qinfo)
elif clicked:
    try:
        tb = state.traceback(folder, support.audit_stamp(folder))
        with st.spinner("Ranking candidate training pairs…"):
            result, qinfo = detail.run_trace(tb, k=k, candidates=int(candidates), **query)
    except Exception as e:  # bad query, missing model/embeddings: say why in the page
        st.error(f"Trace-back failed: {e}")
        st.stop()
    if tb.cache_note:
        st.info(tb.cache_note)
    st.session_state["trace_result"] = (folder, result, qinfo)

# a trace of the audit open before the sidebar's folder changed is not this audit's
if st.session_state.get("trace_result", (None,))[0] == folder:
    _, result, qinfo = st.session_state["trace_result"]
    verdict = "correct" if qinfo["correct"] else "wrong"
    st.markdown(
        f"**Query:** {qinfo['query']}  \n**Prediction:** {qinfo['predicted']!r} ({verdict}), "
        f"p(correct) = {qinfo['p_correct']:.3f}, loss = {qinfo['loss']:.4g}; "
        f"{qinfo['candidates']:,} candidates ranked"
    )
    for name, title in (
        ("responsible", "Responsible: removing these would lower the query's loss"),
        ("helped", "Helped: removing these would raise the query's loss"),
    ):
        st.subheader(title)
        part = result[result["list"] == name]
        if part.empty:
            st.caption("none")
        thumbs, problems = state.thumbnails(info, part["id"].tolist(), size=96)
        for p in problems:
            st.warning(f"Images: {p}")
        cols = ["image", "rank", "id", "relative_influence", "influence", "caption"]
        cols += [c for c in ("image_similarity", "text_similarity") if c in part]
        st.dataframe(
            part.assign(image=[support.data_uri(t) for t in thumbs])[cols],
            hide_index=True,
            row_height=52,
            height=(len(part) + 1) * 52 + 4,
            key=f"trace_{name}",
            column_config={"image": st.column_config.ImageColumn("image", width="small")},
        )
