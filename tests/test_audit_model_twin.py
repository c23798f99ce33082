"""Planted probes in a model mode: the twin audit's rows are real rows' encoder inputs (each
probe's image and caption features are those of the pairs its embeddings come from), half of
the validation pairs join it as clean rows and leave its validation set, and the audit's
ranking is weighted by them."""

import json

import numpy as np
import pandas as pd
import pytest

import ecif
from ecif.audit.auditor import AuditArgs, Auditor
from ecif.audit.baselines import CONSENSUS_K
from ecif.audit.combination_text import describe_combination
from ecif.audit.probes import probe_signals
from ecif.audit.selection import probe_sources
from ecif.cli import main
from ecif.data.features import load_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_probe_sources_by_brute_force():
    g = np.random.default_rng(4)
    n = 300
    x = _unit(g.standard_normal((n, 12)))
    captions = _unit(g.standard_normal((60, 12)))
    y = captions[g.integers(0, 60, n)]  # captions repeat, as shapes' do
    src, text_src, kind = probe_sources(x, y, 0.2, 7)
    assert len(src) == 60 and len(set(src)) == 60
    assert set(kind) == {"shuffle", "near"} and (kind == "shuffle").sum() == 30
    shuffle, near = kind == "shuffle", kind == "near"
    # shuffles: every probe takes another probe's caption, each caption used once
    assert sorted(text_src[shuffle]) == sorted(src[shuffle])
    assert (text_src[shuffle] != src[shuffle]).all()
    # near: among the pairs whose caption differs, the first beyond the CONSENSUS_K with the
    # most similar images (those the consensus reads)
    for i, j in zip(src[near], text_src[near]):
        other = np.nonzero(y @ y[i] < 0.98)[0]
        assert j == other[np.argsort(-(x[other] @ x[i]))[CONSENSUS_K]]


class RecordingAuditor(Auditor):
    """An Auditor that keeps every instance made (the audit and its twin)."""

    made: list = []

    def __post_init__(self):
        super().__post_init__()
        RecordingAuditor.made.append(self)


def _source_rows(emb, pool):
    """For each row of ``emb``, the rows of ``pool`` with the same vector."""
    return [np.nonzero(np.abs(pool - v).max(1) < 1e-6)[0] for v in emb]


@pytest.fixture(scope="module")
def twin_audit(projection_folders):
    """A projection-mode audit with a twin (probes=0.25: 40 probes on 160 pairs), run once:
    (the audit's and the twin's auditors, its table)."""
    sets = [ecif.EmbeddingSet.load(projection_folders[k]) for k in ("train", "val")]
    feats = [load_features(projection_folders[k]) for k in ("train", "val")]
    RecordingAuditor.made = []
    audit = RecordingAuditor(
        *sets,
        AuditArgs(params="projection", batch_size=32, probes=0.25),
        train_features=feats[0],
        val_features=feats[1],
    )
    table = audit.run()
    return list(RecordingAuditor.made), table


def _twin_rows(audit, twin, n, probes, clean):
    """Check ``twin``'s rows against ``audit``'s sets by brute force: ``n`` real rows, then
    ``probes`` planted, then ``clean`` held validation pairs, each row's features those of the
    pairs its embeddings come from. Returns the real rows' and the held rows' positions."""
    train_set, val_set = audit.train, audit.val
    assert len(twin.train) == n + probes + clean == len(twin.train_features.image)
    assert len(twin.val) == len(val_set) - clean == len(twin.val_features.image)
    pool = {
        side: np.concatenate([np.asarray(getattr(s, side)) for s in (train_set, val_set)])
        for side in ("image", "text")
    }
    feats = {
        side: np.concatenate(
            [
                np.asarray(getattr(f, side), np.float32)
                for f in (audit.train_features, audit.val_features)
            ]
        )
        for side in ("image", "text")
    }
    images = _source_rows(np.asarray(twin.train.image), pool["image"])
    assert all(len(r) == 1 for r in images)  # every image is a real one, found once
    image_rows = np.array([r[0] for r in images])
    for side, rows in (("image", [[r] for r in image_rows]), ("text", None)):
        rows = rows or _source_rows(np.asarray(twin.train.text), pool["text"])
        got = np.asarray(getattr(twin.train_features, side), np.float32)
        for k, found in enumerate(rows):  # the features are those of a pair with that vector
            assert len(found) > 0
            np.testing.assert_allclose(got[k], feats[side][found[0]], atol=1e-3)
    m = len(train_set)
    real, probe_img, held = image_rows[:n], image_rows[n : n + probes], image_rows[n + probes :] - m
    assert (real < m).all() and (np.diff(real) > 0).all()  # distinct training rows, in order
    assert np.isin(probe_img, real).all()  # probes copy the twin's own real rows
    own = np.asarray(train_set.text)[probe_img]  # ... with another pair's caption
    assert (np.abs(np.asarray(twin.train.text)[n : n + probes] - own).max(1) > 1e-6).all()
    assert (held >= 0).all() and len(set(held)) == clean
    # the twin's validation pairs are the others, with their own features
    rest = np.array([r[0] for r in _source_rows(np.asarray(twin.val.image), pool["image"])]) - m
    assert set(rest).isdisjoint(held) and len(set(rest) | set(held)) == len(val_set)
    np.testing.assert_allclose(
        np.asarray(twin.val_features.image, np.float32), feats["image"][rest + m], atol=1e-3
    )
    return real, held


def test_projection_twin_plants_real_rows_and_holds_clean_validation_pairs(twin_audit):
    made, table = twin_audit
    assert len(made) == 2
    audit, twin = made
    n, probes, clean = len(audit.train), 40, len(audit.val) // 2
    real, _ = _twin_rows(audit, twin, n, probes, clean)
    np.testing.assert_array_equal(real, np.arange(n))
    weights = table.attrs["combination"]["probe_weights"]
    assert weights["probes"] == probes and weights["clean"] == clean
    assert f"{probes} probes" in describe_combination(table.attrs["combination"])
    # the held validation pairs (clean) are measured in a model mode too
    found = table.attrs["combination"]["validation_noise"]
    low, high = found["interval"]
    assert found["held"] == clean and 0.0 <= low <= found["rate"] <= high <= 1.0


def test_a_sampled_projection_twin_plants_its_sample_rows(twin_audit, monkeypatch):
    """A twin capped below the set's size (a model mode's cap, MODEL_TWIN_MAX_ROWS, as above
    2,000 pairs) samples its real rows; the probes' positions are within the sample, and its
    rows are still real rows' features."""
    import ecif.audit.probes as probes

    assert probes.MODEL_TWIN_MAX_ROWS < probes.TWIN_MAX_ROWS  # a model mode's fits cost more
    monkeypatch.setattr(probes, "MODEL_TWIN_MAX_ROWS", 120)
    made, _ = twin_audit
    audit = made[0]
    RecordingAuditor.made = []
    consensus = np.zeros(len(audit.train))  # the audit's column; the probes' read anew
    signals = probe_signals(audit, 0.25, consensus=consensus)  # the mode's cap
    twin = RecordingAuditor.made[0]
    real, _ = _twin_rows(audit, twin, 120, 30, len(audit.val) // 2)
    want = np.sort(
        np.random.default_rng(audit.args.seed).choice(len(audit.train), 120, replace=False)
    )
    np.testing.assert_array_equal(real, want)
    assert signals.is_probe.sum() == 30 and signals.is_clean.sum() == len(audit.val) // 2


def test_score_cli_in_projection_mode_plants_probes_and_says_so(
    projection_folders, twin_audit, tmp_path, capsys
):
    out = tmp_path / "audit"
    argv = ["score", str(projection_folders["train"]), "--val", str(projection_folders["val"])]
    argv += ["-o", str(out), "--params", "projection", "--batch-size", "32", "--probes", "0.25"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "40 probes told from 32 held-out validation pairs" in said, said
    info = json.loads((out / "audit.json").read_text())
    weights = info["combination"]["probe_weights"]
    assert weights["probes"] == 40 and weights["clean"] == 32
    shards = pd.concat(pd.read_parquet(p) for p in sorted((out / "scores").glob("*.parquet")))
    _, table = twin_audit  # the Python API's audit with the same options: the same ranking
    got = shards.set_index("id")["misalign_score"]
    want = table.set_index("id")["misalign_score"]
    np.testing.assert_allclose(got.loc[want.index].to_numpy(), want.to_numpy(), atol=1e-4)


def test_stacked_rows_read_as_the_copy_would():
    from ecif.data.features import StackedRows

    g = np.random.default_rng(0)
    a = g.standard_normal((50, 3, 2)).astype(np.float16)
    b = g.standard_normal((20, 3, 2)).astype(np.float16)
    ra, rb = g.integers(0, 50, 30), g.permutation(20)[:7]
    want = np.concatenate([a[ra], b[rb]])
    view = StackedRows([(a, ra), (b, rb)])
    assert len(view) == 37 and view.shape == want.shape and view.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(view), want)
    pick = g.permutation(37)[:11]
    np.testing.assert_array_equal(view[pick], want[pick])
    np.testing.assert_array_equal(view[5:33:4], want[5:33:4])
    np.testing.assert_array_equal(view[31], want[31])
    np.testing.assert_array_equal(np.asarray(view, np.float32), want.astype(np.float32))
    nested = StackedRows([(view, pick)])  # rows of rows: a cross-fit half of a twin
    np.testing.assert_array_equal(nested[2:9], want[pick][2:9])
