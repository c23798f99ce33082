"""knn_disagreement: the LEMoN-style kNN consensus, an audit's fifth signal with a validation
set. Checked against a brute-force loop written here, not against the code's own search."""

import numpy as np
import pytest

import ecif
from ecif.audit.baselines import lemon, lemon_queries
from ecif.audit.combination_text import describe_combination
from ecif.audit.probes import held_out_clean, probe_signals
from ecif.audit.selection import make_probes
from ecif.data import neighbours
from ecif.data.neighbours import nearest_rows


def _unit(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _brute_lemon(x, y, k=10, temp=5.0):
    """Each pair's cosine distance plus both neighbour terms, one row at a time (float64), and
    which rows have no tie at their k-th neighbour (repeated captions tie; any of the tied
    rows is a right answer there)."""
    x, y = _unit(x), _unit(y)
    n = len(x)
    out, clear = 1.0 - (x * y).sum(1), np.ones(n, dtype=bool)
    for a, b in ((x, y), (y, x)):
        for i in range(n):
            sims = a @ a[i]
            sims[i] = -np.inf
            order = np.argsort(-sims, kind="stable")
            nn = order[:k]
            clear[i] &= sims[order[k - 1]] - sims[order[k]] > 1e-5
            w = np.exp(-temp * (1.0 - sims[nn]))
            out[i] += (w * (1.0 - b[nn] @ b[i])).sum() / w.sum()
    return out, clear


def _brute_queries(x, y, qx, qy, k=10, temp=5.0):
    """``lemon`` of pairs outside the set (x, y), one query at a time (float64)."""
    x, y, qx, qy = _unit(x), _unit(y), _unit(qx), _unit(qy)
    out = 1.0 - (qx * qy).sum(1)
    for a, b, qa, qb in ((x, y, qx, qy), (y, x, qy, qx)):
        for i in range(len(qa)):
            sims = a @ qa[i]
            nn = np.argsort(-sims, kind="stable")[:k]
            w = np.exp(-temp * (1.0 - sims[nn]))
            out[i] += (w * (1.0 - b[nn] @ qb[i])).sum() / w.sum()
    return out


def _pairs(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x, (x + rng.standard_normal((n, d))).astype(np.float32)


def test_nearest_rows_are_the_brute_force_neighbours_without_the_row_itself():
    x, _ = _pairs()
    x[7] = x[3]  # an exact duplicate is a neighbour like any other
    sims, rows = nearest_rows(x, 5)
    full = _unit(x) @ _unit(x).T
    np.fill_diagonal(full, -np.inf)
    want = np.sort(full, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(sims, want, atol=1e-5)
    assert not (rows == np.arange(len(x))[:, None]).any()
    assert rows[3, 0] == 7 and rows[7, 0] == 3
    # more neighbours asked for than there are other rows: all of them
    sims, rows = nearest_rows(x[:4], 10)
    assert rows.shape == (4, 3) and sorted(rows[0]) == [1, 2, 3]
    with pytest.raises(ValueError, match="at least 2 rows"):
        nearest_rows(x[:1], 3)
    with pytest.raises(ValueError, match="kind must be one of"):
        nearest_rows(x, 3, kind="hnsw")
    with pytest.raises(ValueError, match="the index holds 4 rows"):  # built over other rows
        nearest_rows(x, 3, index=neighbours.neighbour_index(x[:4]))


def test_the_ivf_search_of_a_large_set_keeps_most_true_neighbours(monkeypatch):
    monkeypatch.setattr(neighbours, "EXACT_MAX_ROWS", 500)  # IVF from 500 rows, as from 50k
    x, _ = _pairs(n=3000, d=8)
    _, rows = nearest_rows(x, 10)
    assert (rows == nearest_rows(x, 10, kind="ivf")[1]).all()  # auto chose IVF
    full = _unit(x) @ _unit(x).T
    np.fill_diagonal(full, -np.inf)
    truth = np.argsort(-full, axis=1)[:, :10]
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)])
    assert recall > 0.9, recall
    assert not (rows == np.arange(len(x))[:, None]).any()


def test_lemon_is_the_brute_force_formula():
    x, y = _pairs(n=200)
    want, clear = _brute_lemon(x, y)
    assert clear.all()
    np.testing.assert_allclose(lemon(x, y), want, rtol=1e-4, atol=1e-4)


def test_lemon_of_pairs_outside_the_set_is_the_brute_force_formula():
    x, y = _pairs(n=300)
    qx, qy = _pairs(n=40, seed=1)
    qx[0] = x[5]  # a copy of a pair's image (a planted probe) finds that pair first
    np.testing.assert_allclose(
        lemon_queries(x, y, qx, qy), _brute_queries(x, y, qx, qy), rtol=1e-4, atol=1e-4
    )


def _sets(n=400, n_val=200, d=16, seed=0):
    x, y, frame = ecif.datasets.concept_pairs(n, d, 0.2, "mixed", seed=seed, geometry="aligned")
    xv, yv, _ = ecif.datasets.concept_pairs(n_val, d, 0.0, seed=seed + 1, geometry="aligned")
    train = ecif.EmbeddingSet(x, y, logit_scale=100.0)
    return train, ecif.EmbeddingSet(xv, yv, logit_scale=100.0), frame["is_corrupted"].to_numpy()


def test_an_audit_with_a_validation_set_combines_the_consensus_of_its_own_and_its_twins_rows():
    train, val, labels = _sets()
    aud = ecif.Auditor(train, val, ecif.AuditArgs(seed=0))
    table = aud.run()
    want, clear = _brute_lemon(train.image, train.text)
    assert clear.mean() > 0.5
    got = table["knn_disagreement"].to_numpy()
    np.testing.assert_allclose(got[clear], want[clear], rtol=1e-4, atol=1e-4)
    combination = table.attrs["combination"]
    assert combination["signals"][-1] == "knn_disagreement"
    assert combination["probe_weights"]["signals"][-1] == "knn_disagreement"
    assert "knn_disagreement" in describe_combination(combination)
    # the twin audit's consensus is over its own rows (sampled pairs plus planted probes)
    twin = aud.probes.suspicions["knn_disagreement"]
    assert len(twin) == len(aud.probes.is_probe) > len(train)
    # it separates the planted noise (the aligned encoder knows the domain)
    from ecif.audit.metrics import average_precision

    assert average_precision(labels, table["knn_disagreement"].to_numpy()) > 0.5


def test_a_sampled_twin_reads_the_consensus_of_the_whole_set():
    """A twin over a sample of the pairs: its real rows carry the audit's own values (over
    every pair), its probes the consensus of new pairs among every pair, not the sample's."""

    train, val, _ = _sets(n=600)
    aud = ecif.Auditor(train, val, ecif.AuditArgs(seed=0, probes=0.0))
    table = aud.run()
    whole = table["knn_disagreement"].to_numpy()
    twin = probe_signals(aud, 0.1, max_rows=300, consensus=whole)
    got = twin.suspicions["knn_disagreement"]
    rows = np.sort(np.random.default_rng(0).choice(len(train), 300, replace=False))
    x, y = np.asarray(train.image)[rows], np.asarray(train.text)[rows]
    px, py, _ = make_probes(x, y, 0.1, 0)
    m = len(px)
    held, _ = held_out_clean(val, 0)  # validation pairs the twin holds as clean rows
    assert len(got) == 300 + m + len(held) and twin.is_probe.sum() == m
    np.testing.assert_allclose(got[:300], whole[rows], rtol=1e-6)
    want = _brute_queries(train.image, train.text, px, py)
    np.testing.assert_allclose(got[300 : 300 + m], want, rtol=1e-4, atol=1e-4)
    # the clean rows, too, are new pairs among every training pair
    cx, cy = np.asarray(val.image)[held], np.asarray(val.text)[held]
    clean = _brute_queries(train.image, train.text, cx, cy)
    # (a validation pair can sit at a tie between its 10th and 11th neighbours: all but one)
    close = np.isclose(got[300 + m :], clean, rtol=1e-4, atol=1e-4)
    assert close.sum() >= len(held) - 1
    # over the sample alone (the behaviour before) the probes' values differ
    alone = probe_signals(aud, 0.1, max_rows=300).suspicions["knn_disagreement"]
    assert np.abs(alone[300 : 300 + m] - want).max() > 0.01


def test_a_sampled_twin_queries_the_audits_own_indexes(monkeypatch):
    import functools

    from ecif.audit import auditor as auditor_module
    from ecif.audit import baselines

    train, val, _ = _sets(n=600)
    built = []
    real = baselines.neighbour_index

    def counted(vectors, *args, **kwargs):
        built.append(len(vectors))
        return real(vectors, *args, **kwargs)

    monkeypatch.setattr(baselines, "neighbour_index", counted)
    sampled = functools.partial(probe_signals, max_rows=300)
    monkeypatch.setattr(auditor_module, "probe_signals", sampled)
    aud = ecif.Auditor(train, val, ecif.AuditArgs(seed=0, probes=0.1))
    aud.run()
    assert built == [600, 600]  # the audit's images and captions, each indexed once
    assert aud.neighbours is None  # not kept after the probes
    rows = np.sort(np.random.default_rng(0).choice(len(train), 300, replace=False))
    px, py, _ = make_probes(np.asarray(train.image)[rows], np.asarray(train.text)[rows], 0.1, 0)
    got = aud.probes.suspicions["knn_disagreement"][300 : 300 + len(px)]
    want = _brute_queries(train.image, train.text, px, py)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _captioned(n=330, k=11, seed=0):
    x, y, _ = ecif.datasets.concept_pairs(
        n, 16, 0.2, "mixed", seed=seed, geometry="aligned", captions_per_image=k
    )
    return ecif.EmbeddingSet(x, y, logit_scale=100.0)


@pytest.mark.parametrize("no_val", ["self", "crossfit"])
@pytest.mark.parametrize("captions", [1, 11])
def test_without_a_validation_set_the_head_mode_combines_the_consensus_too(no_val, captions):
    # 11 captions an image: its 10 nearest images are its own, so no neighbour ties
    train = _sets(n=300)[0] if captions == 1 else _captioned()
    aud = ecif.Auditor(train, None, ecif.AuditArgs(seed=0, no_val=no_val))
    table = aud.run()
    want, clear = _brute_lemon(train.image, train.text)
    assert clear.mean() > 0.5
    got = table["knn_disagreement"].to_numpy()
    np.testing.assert_allclose(got[clear], want[clear], rtol=1e-4, atol=1e-4)
    assert table.attrs["combination"]["signals"][-1] == "knn_disagreement"
    assert "trusted_loss" not in table
    # the twin's probes carry their own consensus (over the twin's rows), as with validation
    assert len(aud.probes.suspicions["knn_disagreement"]) == len(aud.probes.is_probe)


def test_without_a_validation_set_the_consensus_may_be_named_alone():
    from scipy.stats import spearmanr

    train, _, _ = _sets(n=300)
    table = ecif.Auditor(train, None, ecif.AuditArgs(seed=0, weights="knn_disagreement")).run()
    want, _ = _brute_lemon(train.image, train.text)
    assert spearmanr(table["misalign_score"], want).statistic > 0.999


def test_weights_can_name_a_validated_signal_alone():
    from scipy.stats import spearmanr

    train, val, _ = _sets(n=400)
    table = ecif.Auditor(train, val, ecif.AuditArgs(seed=0, weights="knn_disagreement")).run()
    want, _ = _brute_lemon(train.image, train.text)
    # the score is the brute-force consensus, standardised: the same order
    assert spearmanr(table["misalign_score"], want).statistic > 0.999
    assert table.attrs["combination"]["weights"]["knn_disagreement"] == 1.0
    # without a validation set that signal does not exist: one clear error, before any fit
    with pytest.raises(ValueError, match="exists only with a validation set"):
        ecif.Auditor(train, None, ecif.AuditArgs(weights="trusted_loss")).run()
    # nor the consensus in a model mode without one (it is computed there only with one)
    from ecif.audit.checks import check_weights

    for params in ("projection", "lora"):
        with pytest.raises(ValueError, match="a validation set or params=head"):
            check_weights("knn_disagreement", False, params)
    check_weights("knn_disagreement", False, "head")


def test_cli_refuses_a_validated_signal_without_validation_before_fitting(
    tmp_path, capsys, monkeypatch
):
    from ecif.cli import main
    from tests.test_audit_shards import _folder
    from tests.test_cli_errors import FAST, _no_fit, _one_error_line

    folder, _ = _folder(tmp_path)
    _no_fit(monkeypatch)
    out = tmp_path / "out"
    rc = main(["score", str(folder), "-o", str(out), "--weights", "trusted_loss", *FAST])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, "trusted_loss", "validation set")
    assert not out.exists()
