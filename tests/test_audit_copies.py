"""Exact copies of a pair: found bit for bit, fit and scored once, every copy given its pair's
scores. Checked against brute force and against auditing the distinct pairs alone."""

import json
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import ecif
from ecif.app.detail import negative_members
from ecif.audit import AuditArgs
from ecif.audit.clean import compare_cleaning, drop_choices
from ecif.audit.folder import read_heads
from ecif.audit.shards import load_training_set, score_shards
from ecif.audit.trace import TraceBack
from ecif.audit.verify import verify
from ecif.cli import main
from ecif.data.duplicates import COPIES, CopiedPairsWarning, first_copies
from tests.test_audit_shards import _folder


def _brute_first(x, y):
    first = np.arange(len(x))
    for i in range(len(x)):
        for j in range(i):
            if x[i].tobytes() == x[j].tobytes() and y[i].tobytes() == y[j].tobytes():
                first[i] = j
                break
    return first


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_first_copies_matches_brute_force(dtype):
    g = np.random.default_rng(0)
    x = g.standard_normal((300, 6)).astype(dtype)
    y = g.standard_normal((300, 5)).astype(dtype)
    src, dst = g.integers(0, 150, 120), g.choice(np.arange(150, 300), 120, replace=False)
    x[dst], y[dst] = x[src], y[src]
    y[dst[:20], 0] = np.nextafter(y[dst[:20], 0], dtype(np.inf))  # one ulp off: not copies
    x[dst[20:30]] = x[(src[20:30] + 1) % 150]  # same caption, another image: not copies
    first = first_copies(x, y)
    np.testing.assert_array_equal(first, _brute_first(x, y))
    assert int((first != np.arange(300)).sum()) >= 85  # the 90 planted (a nudged pair may match)


def _concepts(n, seed, noise=0.2):
    x, y, frame = ecif.datasets.concept_pairs(n, 16, noise, "mixed", seed=seed)
    return x, y, frame["is_corrupted"].to_numpy()


def _with_copies(n_distinct=360, n_copies=140, seed=0):
    """A set whose rows are ``n_distinct`` pairs and ``n_copies`` copies of some of them, in
    shuffled order; and the positions of each row's first identical row."""
    x, y, _ = _concepts(n_distinct, seed)
    g = np.random.default_rng(seed + 1)
    rows = np.concatenate([np.arange(n_distinct), g.integers(0, n_distinct, n_copies)])
    g.shuffle(rows)
    _, first_of = np.unique(rows, return_index=True)
    return ecif.EmbeddingSet(x[rows], y[rows], ids=np.arange(len(rows))), first_of[rows]


def test_fit_over_members_is_the_fit_of_those_rows_alone():
    train, first = _with_copies()
    distinct = np.flatnonzero(first == np.arange(len(first)))
    opts = dict(batch_size=64, lam=1e-2, logit_scale=10.0, dtype="float64", tol=1e-10)
    head = ecif.fit(train, members=distinct, **opts)
    alone = ecif.fit(train.subset(distinct), **opts)
    assert head.n_norm == len(distinct) and head.partition.n == len(train)
    torch.testing.assert_close(head.m, alone.m, atol=1e-8, rtol=0)
    mapped = np.where(alone.partition.index >= 0, distinct[alone.partition.index], -1)
    np.testing.assert_array_equal(head.partition.index, mapped)
    assert not np.isin(np.setdiff1d(np.arange(len(train)), distinct), head.partition.index).any()


@pytest.mark.parametrize("validation", ["val", "self", "crossfit"])
def test_an_audit_with_copies_is_the_audit_of_its_distinct_pairs(validation):
    train, first = _with_copies()
    distinct = np.flatnonzero(first == np.arange(len(first)))
    xv, yv, _ = _concepts(200, 9, noise=0.0)
    val = ecif.EmbeddingSet(xv, yv) if validation == "val" else None
    no_val = "auto" if validation == "val" else validation
    args = AuditArgs(dtype="float64", no_val=no_val, seed=3)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        table = ecif.Auditor(train, val, args).run()
    copies_said = [w for w in said if issubclass(w.category, CopiedPairsWarning)]
    assert len(copies_said) == 1 and "140 of the 500 training rows" in str(copies_said[0].message)
    assert table.attrs["copies"] == 140 and any("140 of" in w for w in table.attrs["warnings"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = ecif.Auditor(train.subset(distinct), val, args).run()
    assert alone.attrs["copies"] == 0
    of_row = np.searchsorted(distinct, first)  # each row's pair in the distinct audit
    np.testing.assert_array_equal(table["id"], train.ids)
    numeric = [c for c in alone.columns if c not in ("id", "caption", "rank", "is_misaligned")]
    for col in numeric:
        want = alone[col].to_numpy(np.float64)[of_row]
        got = table[col].to_numpy(np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6, equal_nan=True, err_msg=col)
    np.testing.assert_array_equal(table["is_misaligned"], alone["is_misaligned"].to_numpy()[of_row])
    assert table["is_misaligned"].sum() == table.attrs["flagged"] > 0
    assert table.attrs["flagged_pairs"] == alone.attrs["flagged"] == alone["is_misaligned"].sum()
    # ranks run over rows: a pair's copies next to each other, in the distinct audit's order
    order = table.sort_values("rank")
    assert (np.diff(alone["rank"].to_numpy()[of_row][order.index]) >= 0).all()


def test_keep_audits_every_row_as_it_is():
    train, first = _with_copies()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        table = ecif.Auditor(train, args=AuditArgs(duplicates="keep", no_val="self")).run()
    assert not [w for w in said if issubclass(w.category, CopiedPairsWarning)]
    assert table.attrs["copies"] == 0
    loss = table["pair_loss"].to_numpy()
    copy = first != np.arange(len(first))
    # a copy in another batch than its pair has another loss: each row was scored as itself
    assert np.abs(loss[copy] - loss[first[copy]]).max() > 1e-3


def _copy_rows_across_parts(folder, count=12, seed=0):
    """Overwrite rows of parts 2 and 3 with rows of parts 0 and 1 (both embeddings)."""
    for side in ("img_emb", "text_emb"):
        src_parts = [np.load(folder / side / f"{side}_{k}.npy") for k in (0, 1)]
        for k in (2, 3):
            path = folder / side / f"{side}_{k}.npy"
            a = np.load(path)
            rng = np.random.default_rng([seed, k])
            a[rng.choice(len(a), count, replace=False)] = src_parts[k - 2][
                rng.integers(8, len(src_parts[0]), count)
            ]
            np.save(path, a)


@pytest.mark.parametrize("validation", [True, False])
def test_folder_scores_equal_the_distinct_audit(tmp_path, validation):
    folder, val = _folder(tmp_path, parts=4, rows=50)
    _copy_rows_across_parts(folder)
    val = val if validation else None
    args = AuditArgs(batch_size=16, logit_scale=10.0, threshold=0.1, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score_shards(folder, tmp_path / "out", val, args=args, log=lambda s: None)
        train = load_training_set(folder)
        first = first_copies(np.asarray(train.image), np.asarray(train.text))
        distinct = np.flatnonzero(first == np.arange(len(first)))
        assert len(train) - len(distinct) == 24
        alone = ecif.Auditor(train.subset(distinct), val, args).run()
    files = sorted((tmp_path / "out" / "scores").glob("*.parquet"))
    shards = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    scored = shards[shards["status"] == "ok"].reset_index(drop=True)
    np.testing.assert_array_equal(scored["id"], train.ids)
    of_row = np.searchsorted(distinct, first)
    for col in [c for c in alone.columns if c not in ("id", "caption", "rank", "is_misaligned")]:
        np.testing.assert_allclose(
            scored[col].to_numpy(np.float64),
            alone[col].to_numpy(np.float64)[of_row],
            rtol=1e-3,
            atol=1e-5,
            equal_nan=True,
            err_msg=col,
        )
    np.testing.assert_array_equal(
        scored["is_misaligned"], alone["is_misaligned"].to_numpy()[of_row]
    )
    info = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert info["flagged"] == shards["is_misaligned"].sum() > 0  # rows, copies included
    assert info["flagged_pairs"] == scored["is_misaligned"].to_numpy()[distinct].sum()
    assert info["copies"] == 24
    # a rerun with another threshold keeps every shard and flags 30 pairs, copies with them
    again = replace(args, threshold=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score_shards(folder, tmp_path / "out", val, args=again, log=lambda s: None)
    rescored = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    rescored = rescored[rescored["status"] == "ok"].reset_index(drop=True)
    np.testing.assert_array_equal(rescored["misalign_score"], scored["misalign_score"])
    flags = rescored["is_misaligned"].to_numpy()
    assert flags[distinct].sum() == 30
    np.testing.assert_array_equal(flags, flags[first])


def test_trace_and_batch_members_of_a_copy_are_its_pairs(tmp_path):
    folder, val = _folder(tmp_path, parts=4, rows=50)
    _copy_rows_across_parts(folder)
    args = AuditArgs(batch_size=16, logit_scale=10.0, lam=1e-2, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score_shards(folder, tmp_path / "out", val, args=args, log=lambda s: None)
        tb = TraceBack.from_audit(tmp_path / "out")
        train = load_training_set(folder)
        first = first_copies(np.asarray(train.image), np.asarray(train.text))
        distinct = np.flatnonzero(first == np.arange(len(first)))
        alone = ecif.Auditor(train.subset(distinct), val, args)
        alone.run()
    test = ecif.EmbeddingSet(val.image[:4], val.text[:4], ids=np.array(["a", "b", "c", "d"]))
    q = tb.query_from_set(test, "a")
    table, info = tb.trace(q, k=500, candidates=None)
    assert info["candidates"] == len(distinct)  # each pair once, as its first row
    assert set(table["row"]) <= set(distinct)
    holding = np.bincount(first, minlength=len(first))
    np.testing.assert_array_equal(table["copies"], holding[table["row"].to_numpy()])
    assert (table["copies"] > 1).any()
    # the same ranking as a trace over the distinct pairs with the distinct audit's head
    ref_tb = TraceBack(alone.heads[0], train.subset(distinct))
    ref, _ = ref_tb.trace(ref_tb.query_from_set(test, "a"), k=500, candidates=None)
    np.testing.assert_array_equal(table["row"], distinct[ref["row"].to_numpy()])
    np.testing.assert_allclose(table["relative_influence"], ref["relative_influence"], rtol=1e-4)
    # the batch members a copy affected through the negative term are its pair's
    heads = read_heads(tmp_path / "out")
    copy = int(np.flatnonzero(first != np.arange(len(first)))[0])
    pd.testing.assert_frame_equal(
        negative_members(tmp_path / "out", train, heads, copy),
        negative_members(tmp_path / "out", train, heads, int(first[copy])),
    )


def test_ecif_score_says_it_once_and_records_the_option(tmp_path, capsys):
    folder, _ = _folder(tmp_path, parts=4, rows=50)
    _copy_rows_across_parts(folder)
    for extra, times in (([], 1), (["--duplicates", "keep"], 0)):
        out = tmp_path / f"audit{len(extra)}"
        assert main(["score", str(folder), "-o", str(out), "--quiet", *extra]) == 0
        printed = capsys.readouterr()
        said = printed.err
        assert said.count(f"warning: 24 of the 199 training rows (12.1%) are {COPIES}") == times
        info = json.loads((out / "audit.json").read_text())
        table = pd.concat(
            [pd.read_parquet(f) for f in sorted((out / "scores").glob("*.parquet"))]
        ).reset_index(drop=True)
        ok = table[table["status"] == "ok"].reset_index(drop=True)
        train = load_training_set(folder)
        first = first_copies(np.asarray(train.image), np.asarray(train.text))
        flags = ok["is_misaligned"].to_numpy()
        rows, pairs = int(flags.sum()), int(flags[first == np.arange(len(first))].sum())
        if times:  # the count as rows and as the pairs the threshold counts
            assert rows > pairs  # here some flagged pairs have copies
            assert f"flagged {rows} rows: {pairs} pairs and {rows - pairs} copies" in printed.out
        else:
            assert f"flagged {rows} (" in printed.out
        assert info["options"]["duplicates"] == ("keep" if extra else "collapse")
        assert sum(COPIES in w for w in info.get("warnings", [])) == times


def test_warm_start_keeps_the_collapsed_heads_weighting():
    train, first = _with_copies()
    distinct = np.flatnonzero(first == np.arange(len(first)))
    opts = dict(batch_size=64, lam=1e-2, logit_scale=10.0, dtype="float64", tol=1e-10)
    head = ecif.fit(train, members=distinct, **opts)
    again = ecif.fit(train, init=head, **opts)  # already stationary: stays where it is
    assert again.n_norm == len(distinct)
    torch.testing.assert_close(again.m, head.m, atol=1e-9, rtol=0)


def test_verify_and_clean_remove_pairs_not_copies(tmp_path):
    train, first = _with_copies()
    distinct = np.flatnonzero(first == np.arange(len(first)))
    xv, yv, _ = _concepts(200, 9, noise=0.0)
    val = ecif.EmbeddingSet(xv, yv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aud = ecif.Auditor(train, val, AuditArgs(dtype="float64", seed=1))
        table = aud.run()
    head = aud.heads[0]
    rho, refits = verify(head, train, val, k=8, seed=0)
    assert set(refits["id"]) <= set(train.ids[distinct]) and np.isfinite(rho)
    assert refits["actual"].abs().min() > 0  # every refit removed a pair from its batch
    result = compare_cleaning(head, train, val, table, seed=0)
    flagged_pairs = int(table["is_misaligned"].to_numpy()[distinct].sum())
    assert (result["dropped"].iloc[1:] == flagged_pairs).all()
    choices = drop_choices(table, flagged_pairs, 0, distinct)
    for rows in choices.values():  # pairs, each once, none a copy
        assert np.isin(rows, distinct).all() and len(np.unique(rows)) == flagged_pairs
    flagged = set(train.ids[distinct][table["is_misaligned"].to_numpy()[distinct]])
    assert set(train.ids[choices["ecif"]]) == flagged


def test_rows_whose_hashes_collide_are_told_apart_exactly(monkeypatch):
    """Every row given one hash: the exact check alone must find the copies."""
    import ecif.data.duplicates as dup

    g = np.random.default_rng(5)
    x = g.standard_normal((60, 4)).astype(np.float32)
    y = g.standard_normal((60, 3)).astype(np.float32)
    x[40:], y[40:] = x[:20], y[:20]
    y[50:55] += 1.0  # same images, other captions: not copies
    monkeypatch.setattr(dup, "_row_hashes", lambda arr, seed: np.zeros(len(arr), np.uint64))
    np.testing.assert_array_equal(first_copies(x, y), _brute_first(x, y))


def test_the_twins_clean_rows_keep_an_images_captions_together():
    from ecif.audit.probes import held_out_clean

    x, y, _ = ecif.datasets.concept_pairs(403, 16, seed=2, captions_per_image=5)
    held, rest = held_out_clean(ecif.EmbeddingSet(x, y), seed=3)
    other = np.setdiff1d(np.arange(len(x)), held)
    assert not set(held // 5) & set(other // 5)  # no image on both sides
    assert abs(len(held) - len(x) // 2) <= 5 and len(rest) == len(other)
    np.testing.assert_array_equal(rest.image, x[other])
    # one caption an image: the seeded half of the rows, as a plain permutation gives it
    x1, y1, _ = ecif.datasets.concept_pairs(400, 16, seed=2)
    held1, _ = held_out_clean(ecif.EmbeddingSet(x1, y1), seed=3)
    order = np.random.default_rng([3, 5]).permutation(400)
    np.testing.assert_array_equal(held1, np.sort(order[:200]))
