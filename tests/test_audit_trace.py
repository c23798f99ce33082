"""Trace-back: FAISS indexes against numpy, a planted misprediction, brute-force ranking, CLI."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import ecif
from ecif.audit.trace import TraceBack, TraceQuery, interleave, query_loss_and_gradient
from ecif.data.index import FaissIndexError, VectorIndex, build_indexes, load_indexes
from tests.engine_reference import Reference

F64 = dict(batch_size=16, lam=1e-2, logit_scale=10.0, dtype="float64", newton_steps=3)


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _brute_topk(base, queries, k):
    sims = _unit(queries.astype(np.float64)) @ _unit(base.astype(np.float64)).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k], np.sort(sims, axis=1)[:, ::-1][:, :k]


# --- (a) the index -------------------------------------------------------------------------
def test_flat_index_equals_numpy_topk_and_round_trips(tmp_path):
    g = np.random.default_rng(0)
    base = g.standard_normal((3000, 24)).astype(np.float16)  # not normalised, float16 memmap
    np.save(tmp_path / "emb.npy", base)
    mm = np.load(tmp_path / "emb.npy", mmap_mode="r")
    idx = VectorIndex.build(mm, side="image", kind="auto", chunk=700)
    assert idx.info.kind == "flat" and idx.n == 3000
    queries = g.standard_normal((7, 24))
    scores, rows = idx.search(queries, 10)
    exp_rows, exp_scores = _brute_topk(base, queries, 10)
    assert np.allclose(scores, exp_scores, atol=1e-5)
    assert (rows == exp_rows).mean() > 0.98  # ties only
    idx.save(tmp_path / "index")
    again = VectorIndex.load(tmp_path / "index", "image")
    s2, r2 = again.search(queries, 10)
    assert np.array_equal(r2, rows) and np.allclose(s2, scores)
    assert again.info == idx.info
    with pytest.raises(FaissIndexError, match="width"):
        idx.search(np.ones((1, 5)), 3)
    with pytest.raises(FaissIndexError, match="ecif index"):
        VectorIndex.load(tmp_path / "index", "text")


def test_ivf_recall_is_sane_and_nprobe_trades_speed_for_recall(tmp_path):
    g = np.random.default_rng(1)
    centers = g.standard_normal((40, 32))
    base = centers[g.integers(0, 40, 8000)] + 0.5 * g.standard_normal((8000, 32))
    queries = base[g.choice(8000, 50, replace=False)] + 0.1 * g.standard_normal((50, 32))
    idx = VectorIndex.build(base, side="text", kind="ivf", nlist=64, nprobe=1)
    assert idx.info.kind == "ivf" and idx.info.nlist == 64
    exp_rows, _ = _brute_topk(base, queries, 10)

    def recall():
        rows = idx.search(queries, 10)[1]
        return np.mean([len(set(r) & set(e)) / 10 for r, e in zip(rows, exp_rows, strict=True)])

    low = recall()
    idx.set_nprobe(16)
    high = recall()
    assert high >= 0.9 and high >= low
    both = build_indexes(base, base, tmp_path / "ix", kind="ivf", nlist=64, nprobe=16)
    loaded = load_indexes(tmp_path / "ix")
    assert loaded["text"].info.nprobe == 16 and loaded["image"].n == both["image"].n


def test_an_ivf_index_saved_with_nprobe_0_searches_at_the_default(tmp_path):
    """`ecif index --nprobe 0` once wrote such indexes; faiss refuses to search them
    ('cur_nprobe > 0'), so loading sets the default and the search finds what brute force
    finds."""
    import json

    import faiss

    from ecif.data.index import DEFAULT_NPROBE

    g = np.random.default_rng(2)
    base = g.standard_normal((2000, 16))
    VectorIndex.build(base, side="image", kind="ivf", nlist=32, nprobe=4).save(tmp_path)
    raw = faiss.read_index(str(tmp_path / "image.faiss"))
    raw.nprobe = 0
    faiss.write_index(raw, str(tmp_path / "image.faiss"))
    meta = json.loads((tmp_path / "image.json").read_text())
    (tmp_path / "image.json").write_text(json.dumps({**meta, "nprobe": 0}))
    idx = VectorIndex.load(tmp_path, "image")
    assert idx.info.nprobe == DEFAULT_NPROBE  # all 32 lists: exact
    rows = idx.search(base[:5], 3)[1]
    assert [set(r) for r in rows] == [set(e) for e in _brute_topk(base, base[:5], 3)[0]]


def test_interleave_merges_ranked_lists_without_duplicates():
    out = interleave([np.array([5, 1, 2, -1]), np.array([1, 7, 5, 9])], 5)
    assert out.tolist() == [5, 1, 7, 2, 9]


# --- (b) a planted misprediction ------------------------------------------------------------
def planted(n_per=40, n_classes=4, d=8, n_plant=6, seed=0):
    """Four classes; six training pairs put class-0 images (shifted along u) with the class-1
    caption. A query image of class 0 shifted along u is then mispredicted as class 1."""
    g = np.random.default_rng(seed)
    a = np.linalg.qr(g.standard_normal((d, d)))[0][:n_classes]
    b = a @ np.linalg.qr(g.standard_normal((d, d)))[0]
    u = np.linalg.qr(g.standard_normal((d, d)))[0][n_classes]
    xs, ys, caps = [], [], []
    for c in range(n_classes):
        xs.append(a[c] + 0.35 * g.standard_normal((n_per, d)) / np.sqrt(d))
        ys.append(b[c] + 0.35 * g.standard_normal((n_per, d)) / np.sqrt(d))
        caps += [f"class {c}"] * n_per
    xs.append(a[0] + 0.9 * u + 0.1 * g.standard_normal((n_plant, d)) / np.sqrt(d))
    ys.append(b[1] + 0.1 * g.standard_normal((n_plant, d)) / np.sqrt(d))
    caps += ["class 1"] * n_plant
    x, y = _unit(np.concatenate(xs)), _unit(np.concatenate(ys))
    n = len(x)
    train = ecif.EmbeddingSet(
        x, y, ids=[f"p{i}" for i in range(n)], metadata=pd.DataFrame({"caption": caps})
    )
    xq = _unit(a[0] + 0.9 * u)
    test = ecif.EmbeddingSet(
        np.concatenate([xq[None], _unit(a[1:])]),
        _unit(b),
        ids=[f"t{c}" for c in range(n_classes)],
        metadata=pd.DataFrame({"caption": [f"class {c}" for c in range(n_classes)]}),
    )
    return train, test, {f"p{i}" for i in range(n - n_plant, n)}


@pytest.fixture(scope="module")
def fitted():
    train, test, plant = planted()
    head = ecif.fit(train, **F64)
    return train, test, plant, head


def test_planted_pairs_are_found_responsible(fitted):
    train, test, plant, head = fitted
    tb = TraceBack(head, train)
    q = tb.query_from_set(test, "t0")
    table, info = tb.trace(q, k=10, candidates=40)
    assert not info["correct"] and info["predicted"] == "class 1"
    resp = table[table["list"] == "responsible"]
    assert plant <= set(resp["id"]), resp
    assert (resp["relative_influence"] < 0).all()
    assert resp["relative_influence"].is_monotonic_increasing
    helped = table[table["list"] == "helped"]
    assert (helped["relative_influence"] > 0).all() and not plant & set(helped["id"])
    full, _ = tb.trace(q, k=10, candidates=None)
    assert plant <= set(full[full["list"] == "responsible"]["id"])


def test_test_pair_correctness_follows_captions_or_a_label_column(fitted):
    train, test, _, head = fitted
    tb = TraceBack(head, train)
    meta = test.metadata.assign(
        caption=["Class 0", "class  0", "class 2", "class 3"],  # t1 repeats t0's caption
        group=["even", "odd", "even", "odd"],
    )
    test2 = ecif.EmbeddingSet(test.image, test.text, ids=test.ids, metadata=meta)
    q = tb.query_from_set(test2, "t0")
    assert q.positive.tolist() == [True, True, False, False]  # case and spacing aside
    q = tb.query_from_set(test2, "t0", label_col="group")
    assert q.positive.tolist() == [True, False, True, False]


def test_exhaustive_ranking_equals_brute_force(fitted):
    train, test, _, head = fitted
    tb = TraceBack(head, train)
    q = tb.query_from_set(test, "t0")
    ranked = tb.rank(q)  # every row
    ref = Reference(head, train.image, train.text)
    h = ref.hessian()
    t = head.logit_scale

    def ce(theta):  # the query loss by autograd, independent of query_loss_and_gradient
        m = theta.reshape(head.m.shape)
        xq = torch.as_tensor(test.image[0])
        logits = t * (xq @ m) @ torch.as_tensor(test.text).T
        return -torch.log_softmax(logits, 0)[0]

    g = torch.func.grad(ce)(head.theta())
    assert torch.allclose(query_loss_and_gradient(head, q)[1], g, atol=1e-12)
    grads = torch.stack([ref.removal_grad(n) for n in range(len(train))])
    d = torch.linalg.solve(h, grads.T).T
    expected = (d @ g / d.norm(dim=1)).numpy()
    assert np.allclose(ranked["relative_influence"], expected, rtol=1e-7, atol=1e-12)
    assert np.allclose(ranked["influence"], (d @ g).numpy() / len(train), rtol=1e-7)
    # EK-FAC norms: the closed form equals the norm of an explicit EK-FAC solve
    inv = ecif.solver(head, train, solver="ekfac")
    rows = np.arange(0, len(train), 7)
    ek = ecif.relative_influence(head, train, g, rows, inverse=inv)
    de = inv.solve(grads[rows])
    assert ek.attrs["norm"] == "ekfac"
    assert np.allclose(ek["relative_influence"], (de @ g / de.norm(dim=1)).numpy(), rtol=1e-7)


def test_text_to_image_query_gradient_against_autograd(fitted):
    train, _, _, head = fitted
    g = np.random.default_rng(3)
    y = _unit(g.standard_normal(8))
    cand = _unit(g.standard_normal((6, 8)))
    pos = np.array([1, 0, 1, 0, 0, 0], dtype=bool)
    q = TraceQuery("text->image", y, cand, pos, [str(i) for i in range(6)])
    info, grad = query_loss_and_gradient(head, q)

    def loss(theta):
        m = theta.reshape(head.m.shape)
        lp = torch.log_softmax(head.logit_scale * torch.as_tensor(cand) @ m @ torch.as_tensor(y), 0)
        return -torch.logsumexp(lp[torch.as_tensor(pos)], 0)

    assert torch.allclose(grad, torch.func.grad(loss)(head.theta()), atol=1e-12)
    assert info["loss"] == pytest.approx(float(loss(head.theta())))


def test_caption_query_with_a_stub_encoder(fitted):
    train, test, plant, head = fitted
    tb = TraceBack(head, train)
    tb.embed_texts = lambda texts: _unit(np.asarray(test.text[[1]]))  # "class 1"
    q = tb.query_from_caption("class 1", competitors=30)
    assert q.direction == "text->image" and q.positive.any()
    table, info = tb.trace(q, k=5, candidates=40)
    assert set(table["list"]) <= {"responsible", "helped"} and info["candidates"] == 40
    tb.embed_texts = lambda texts: _unit(np.ones((1, 8)))
    with pytest.raises(ValueError, match="carries that caption"):
        tb.query_from_caption("no such caption")


def test_caption_positives_prefer_the_exact_caption():
    from ecif.audit.labels import caption_positives

    caps = ["a red circle on the left", "A red  circle on the LEFT", "a red circle on the right"]
    # the text encoder puts all three within 0.98: only the same words count as right
    near = np.array([1.0, 1.0, 0.99])
    expected = np.array([" ".join(c.lower().split()) == "a red circle on the left" for c in caps])
    assert (caption_positives(caps, " a red circle on the left", near) == expected).all()
    # no candidate carries the words: a paraphrase within cosine 0.98 stands in
    para = caption_positives(caps, "a crimson disc, left side", np.array([0.985, 0.5, 0.97]))
    assert para.tolist() == [True, False, False]


# --- (c) the CLI on an audit folder ---------------------------------------------------------
def test_cli_index_and_trace_round_trip(tmp_path, capsys):
    from ecif.audit import AuditArgs, Auditor, write_audit
    from ecif.cli import main

    train, test, plant = planted()
    emb, test_dir, audit = tmp_path / "emb", tmp_path / "test", tmp_path / "audit"
    train.save(emb)
    test.save(test_dir)
    loaded = ecif.EmbeddingSet.load(emb)
    args = AuditArgs(batch_size=16, lam=1e-2, logit_scale=10.0, threshold=0.05)
    auditor = Auditor(loaded, ecif.EmbeddingSet.load(test_dir), args=args)
    table = auditor.run()
    write_audit(audit, table, dict(table.attrs, embeddings=str(emb)), auditor.heads)

    assert main(["index", str(audit), "--quiet"]) == 0
    assert "indexed 166 pairs (image: flat, text: flat)" in capsys.readouterr().out
    assert (audit / "index" / "image.faiss").exists() and (audit / "index" / "text.json").exists()

    out = tmp_path / "trace.csv"
    argv = ["trace", str(audit), "--query-id", "t0", "--test", str(test_dir), "-k", "8"]
    assert main(argv + ["--candidates", "60", "--output", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "RESPONSIBLE" in text and "HELPED" in text and "(WRONG)" in text
    assert "traced 1 query over 60 candidate pairs" in text
    df = pd.read_csv(out)
    resp = set(df[df["list"] == "responsible"]["id"])
    assert len(plant & resp) >= 5, df

    assert main(argv + ["--candidates", "0", "--wrong-answer", "--quiet"]) == 0
    assert "over 166 candidate pairs" in capsys.readouterr().out  # 0 = exhaustive

    classes = tmp_path / "classes.txt"
    classes.write_text("class 0\nclass 1\nclass 2\nclass 3\n")
    # no model in this folder's manifest: class prompts cannot be embedded -> clear error
    assert main(argv + ["--classes", str(classes), "--label", "0"]) == 2
    assert "names no model" in capsys.readouterr().err
    assert main(["trace", str(audit)]) == 2
    assert "give a query" in capsys.readouterr().err
    assert main(["trace", str(audit), "--query-id", "nope", "--test", str(test_dir)]) == 2
    assert "not in this set" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["exact", "ekfac"])
def test_relative_influence_with_learned_scale_and_a_short_batch(method):
    from tests.engine_reference import synthetic_pairs

    x, y, _ = synthetic_pairs(45, 4, noise=0.25, seed=1)  # 45 = 5 x 8 + a short batch
    train = ecif.EmbeddingSet(x, y)
    head = ecif.fit(
        train, batch_size=8, lam=1e-2, logit_scale=8.0, learn_scale=True, dtype="float64"
    )
    ref = Reference(head, x, y)
    g = torch.randn(
        head.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    rows = [0, 3, 44, 40, 21]
    inv = ecif.solver(head, train, solver=method)
    got = ecif.relative_influence(head, train, g, rows, inverse=inv)
    grads = torch.stack([ref.removal_grad(n) for n in rows])
    h = ref.hessian() if method == "exact" else None
    d = torch.linalg.solve(h, grads.T).T if h is not None else inv.solve(grads)
    assert np.allclose(got["relative_influence"], (d @ g / d.norm(dim=1)).numpy(), rtol=1e-7)


def test_image_file_classes_and_caption_queries_with_the_tiny_model(small_audit, tmp_path, capsys):
    """The model path: files and free text embedded as `ecif embed` did, then traced by CLI."""
    import io
    import shutil

    from PIL import Image

    from ecif.cli import main

    audit = tmp_path / "audit"
    shutil.copytree(small_audit, audit)  # the session's folder stays as the app tests expect
    shard = sorted((small_audit / "data" / "val").glob("*.parquet"))[0]
    rows = pd.read_parquet(shard).head(3)
    image = tmp_path / "query.png"
    Image.open(io.BytesIO(rows["jpg"].iloc[0])).save(image)
    caption = rows["caption"].iloc[0]

    tb = TraceBack.from_audit(audit)
    val = ecif.EmbeddingSet.load(small_audit / "embeddings" / "val")
    pos = val.positions([rows["key"].iloc[0]])[0]
    assert float(tb.embed_texts([caption])[0] @ _unit(val.text[pos].astype(float))) > 0.99
    assert float(tb.embed_image(image) @ _unit(val.image[pos].astype(float))) > 0.95

    assert main(["index", str(audit), "--quiet"]) == 0
    capsys.readouterr()
    common = ["-k", "3", "--candidates", "50", "--quiet"]
    assert main(["trace", str(audit), "--image", str(image), "--caption", caption] + common) == 0
    assert "RESPONSIBLE" in capsys.readouterr().out
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(rows["caption"]) + "\n")
    argv = ["trace", str(audit), "--image", str(image), "--classes", str(classes)]
    assert main(argv + ["--label", caption] + common) == 0
    assert "3 class prompts" in capsys.readouterr().out
    train_caption = str(tb.train.metadata["caption"].iloc[0])
    assert main(["trace", str(audit), "--caption", train_caption] + common) == 0
    assert "nearest training images" in capsys.readouterr().out


def test_index_precomputes_norms_that_match_per_candidate_norms(tmp_path, capsys):
    from ecif.audit import AuditArgs, Auditor, write_audit
    from ecif.audit.trace_cache import load_context, load_trace_cache
    from ecif.cli import main

    train, test, _ = planted()
    emb, audit = tmp_path / "emb", tmp_path / "audit"
    train.save(emb)
    loaded = ecif.EmbeddingSet.load(emb)
    args = AuditArgs(batch_size=16, lam=1e-2, logit_scale=10.0, threshold=0.05)
    auditor = Auditor(loaded, test, args=args)
    table = auditor.run()
    write_audit(audit, table, dict(table.attrs, embeddings=str(emb)), auditor.heads)
    assert main(["index", str(audit), "--quiet"]) == 0
    assert "pair norms (exact" in capsys.readouterr().out
    assert (audit / "index" / "context" / "ybar.npy").exists()
    tb = TraceBack.from_audit(audit)
    assert tb.norms is not None and len(tb.norms) == len(loaded)
    assert tb.context is not None and tb.context["ybar"].shape == (len(loaded), 8)
    meta_path = audit / "index" / "context" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "format"}))
    assert load_context(audit / "index", tb.head) is None  # an older layout is never read
    old = TraceBack.from_audit(audit)
    assert old.context is None and "rerun `ecif index`" in old.cache_note
    meta_path.write_text(json.dumps(meta))
    assert TraceBack.from_audit(audit).cache_note is None
    q = tb.query_from_set(test, test.ids[0])
    fast = tb.rank(q)  # every pair, precomputed norms and batch context
    assert fast.attrs["max_bound"] == 0.0  # 32 heaviest members > batch of 16: nothing dropped
    tb.norms, tb.context = None, None
    slow = tb.rank(q)  # every pair, norms computed per candidate from the exact solver
    assert fast.attrs["norm"] == "precomputed" and slow.attrs["norm"] == "exact"
    # float32 heads: the two paths round differently (exact agreement in float64 is
    # tests/test_engine_relative.py's); the lists must be the same
    a, b = fast["relative_influence"].to_numpy(), slow["relative_influence"].to_numpy()
    assert np.allclose(a, b, rtol=0.02, atol=1e-3 * np.abs(b).max())
    assert set(np.argsort(a)[:10]) == set(np.argsort(b)[:10])

    # a 16-probe estimate: same pairs, norms within a factor the estimate allows
    assert main(["index", str(audit), "--quiet", "--norms", "16"]) == 0
    assert "16-probe estimates" in capsys.readouterr().out
    tb_est = TraceBack.from_audit(audit)
    est = tb_est.norms
    assert tb_est.norms_estimated
    tb.precompute_norms(probes=0, progress=False)
    ratio = est / tb.norms
    assert 0.8 < np.median(ratio) < 1.2 and np.abs(ratio - 1).max() > 1e-3
    # estimated norms: each side's top rows (by the estimate) are re-scored with exact norms
    tb_est.args.refine = 5
    got = tb_est.rank(q)
    assert "top" in got.attrs["norm"]
    rel, want = got["relative_influence"].to_numpy(), slow["relative_influence"].to_numpy()
    tb_est.norms_estimated = False
    raw = tb_est.rank(q)["relative_influence"].to_numpy()
    order = np.argsort(raw)
    for top in (order[:5], order[::-1][:5]):
        assert np.allclose(rel[top], want[top], rtol=1e-6)
    assert not np.allclose(raw[order[:5]], want[order[:5]], rtol=1e-3)

    # a refit head never meets stale norms
    head = tb.head
    other = ecif.fit(loaded, batch_size=16, lam=2e-2, logit_scale=10.0)
    assert load_trace_cache(audit / "index", other, loaded.image, loaded.text)[1] is None
    assert load_trace_cache(audit / "index", head, loaded.image, loaded.text)[1] is not None
    assert main(["index", str(audit), "--quiet", "--norms", "lots"]) == 2
    assert "--norms must be" in capsys.readouterr().err


def test_demo_writes_the_trace_precomputations(tmp_path, tiny_clip_dir, monkeypatch):
    import ecif.data.tiny_clip as tc
    from ecif.audit.demo import DemoArgs, run_demo

    monkeypatch.setattr(tc, "tiny_clip", lambda progress=False: tiny_clip_dir)
    out = tmp_path / "demo"
    args = DemoArgs(output=str(out), n_train=300, n_val=100, shard_size=150, batch_size=32)
    figures = run_demo(args, log=lambda s: None)
    assert figures["pairs"] == 300 and figures["auroc"] > 0.6  # shuffled captions found
    # with a validation set it reports the two validated signals alone too
    assert list(figures["signals"])[-2:] == ["trusted_loss", "knn_disagreement"]
    from sklearn.metrics import average_precision_score

    from ecif.audit.folder import read_audit

    table, _ = read_audit(out)
    truth = ecif.datasets.shapes(
        n=300, seed=args.seed, noise=args.noise, noise_kind=args.noise_kind
    ).frame.set_index("key")["is_corrupted"]
    want = average_precision_score(truth.loc[table["id"]], table["knn_disagreement"])
    assert abs(figures["signals"]["knn_disagreement"]["ap"] - want) < 1e-9
    assert (out / "index" / "trace.pt").exists() and (out / "index" / "context").is_dir()
    tb = TraceBack.from_audit(out)
    assert tb.norms is not None and tb.context is not None and tb.cache_note is None
