"""The Auditor, thresholds, cleaning and verification on planted noise (ground truth known)."""

import numpy as np
import pandas as pd
import pytest
import torch

import ecif
from ecif.audit import AuditArgs, Auditor
from ecif.audit.clean import compare_cleaning, one_step_edit, retrieval_accuracy
from ecif.audit.metrics import auroc, average_precision
from ecif.audit.thresholds import estimate_noise_rate, flag_count, rank_and_flag
from ecif.audit.verify import verify
from tests.engine_reference import synthetic_pairs

COLUMNS = [
    "id",
    "caption",
    "clip_score",
    "pair_loss",
    "influence",
    "influence_pos",
    "influence_neg",
    "misalign_score",
    "rank",
    "is_misaligned",
]


def _sets(n=400, d=8, noise=0.2):
    x, y, bad = synthetic_pairs(n, d, noise=noise, seed=21)
    xv, yv, _ = synthetic_pairs(150, d, noise=0.0, seed=22)
    labels = np.zeros(n, dtype=bool)
    labels[bad] = True
    meta = pd.DataFrame({"caption": [f"c{i}" for i in range(n)]})
    return ecif.EmbeddingSet(x, y, metadata=meta), ecif.EmbeddingSet(xv, yv), labels


def test_noise_rate_estimate_on_a_known_mixture():
    rng = np.random.default_rng(0)
    for rate in (0.1, 0.3):
        s = np.concatenate(
            [rng.normal(0, 1, int(5000 * (1 - rate))), rng.normal(6, 1, int(5000 * rate))]
        )
        assert estimate_noise_rate(s) == pytest.approx(rate, abs=0.02)
    assert estimate_noise_rate(rng.normal(0, 1, 5000)) < 0.05


def test_flag_count_and_ranks():
    s = np.array([0.1, 3.0, np.nan, 2.0, -1.0])
    assert flag_count(s, 2)[0] == 2
    assert flag_count(s, 0.5)[0] == 2  # half of the 4 finite scores
    with pytest.raises(ValueError):
        flag_count(s, 1.5)
    rank, flag = rank_and_flag(s, 2)
    assert list(rank) == [3, 1, 5, 2, 4] and list(flag) == [False, True, False, True, False]


@pytest.mark.parametrize("no_val", ["val", "self", "crossfit"])
def test_auditor_finds_planted_misaligned_pairs(no_val):
    train, val, labels = _sets()
    args = AuditArgs(batch_size=32, logit_scale=10.0, no_val="auto" if no_val == "val" else no_val)
    table = Auditor(train, val if no_val == "val" else None, args).run()
    extra = ("self_influence", "trusted_loss", "knn_disagreement")
    assert [c for c in table.columns if c not in extra] == COLUMNS
    assert ("self_influence" in table) == (no_val == "self")
    assert ("trusted_loss" in table) == (no_val == "val")  # it needs the validation pairs
    assert "knn_disagreement" in table  # the head mode's consensus, with or without validation
    assert table["influence"].dtype == np.float32
    a = auroc(labels, table["misalign_score"].to_numpy())
    print(
        no_val,
        "AUROC",
        round(a, 3),
        "AP",
        round(average_precision(labels, table["misalign_score"].to_numpy()), 3),
    )
    assert a > 0.85
    assert sorted(table["rank"]) == list(range(1, len(train) + 1))
    flagged = table["is_misaligned"].to_numpy()
    assert flagged.sum() == (table["rank"] <= flagged.sum()).sum()
    assert table.attrs["validation"]


def test_cleaning_beats_random_and_one_step_edit_tracks_refit():
    train, val, labels = _sets(noise=0.25)
    aud = Auditor(train, val, AuditArgs(batch_size=32, logit_scale=10.0, dtype="float64"))
    table = aud.run()
    head = aud.heads[0]
    res = compare_cleaning(head, train, val, table, count=int(labels.sum()))
    by = res.set_index("strategy")
    assert by.loc["drop ecif", "val_loss"] < by.loc["drop random", "val_loss"]
    assert by.loc["drop ecif", "val_loss"] < by.loc["none (all pairs)", "val_loss"]
    drop = np.argsort(-table["misalign_score"].to_numpy())[: int(labels.sum())]
    refit = ecif.fit(
        train, exclude=train.ids[drop], init=head, batch_size=32, logit_scale=10.0, dtype="float64"
    )
    edit = one_step_edit(head, train, drop)
    true_step, pred_step = refit.theta() - head.theta(), edit.theta() - head.theta()
    assert float(torch.nn.functional.cosine_similarity(true_step, pred_step, dim=0)) > 0.9
    m = head.m.numpy()
    logits = np.asarray(val.image) @ m @ np.asarray(val.text).T  # independent: numpy argmax
    expected = float((logits.argmax(1) == np.arange(len(val))).mean())
    assert retrieval_accuracy(head, val) == pytest.approx(expected)


def test_ranking_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.2
    scores = labels * 0.8 + rng.random(300)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), rel=1e-12
    )


def test_verify_reports_high_spearman_on_well_posed_data():
    train, val, _ = _sets(n=240, d=6)
    head = ecif.fit(train, batch_size=24, logit_scale=10.0)
    rho, table = verify(head, train, val, k=12, seed=1)
    assert len(table) == 12 and rho > 0.8


def test_audit_bad_inputs():
    train, val, _ = _sets(n=40)
    with pytest.raises(ValueError, match="at least 2"):
        Auditor(train.subset([0]), val).run()
    wrong = ecif.EmbeddingSet(np.ones((10, 5)), np.ones((10, 5)))
    with pytest.raises(ValueError, match="widths"):
        Auditor(train, wrong).run()
    with pytest.raises(KeyError, match="not in this set"):
        ecif.fit(train, exclude=["no-such-id"])
    with pytest.raises(ValueError, match="2-D"):
        ecif.EmbeddingSet(np.ones(5), np.ones(5))


def test_more_trusted_than_training_pairs_advises_trusted_loss(tmp_path, capsys):
    """Measured (benchmarks/README.md, small sets): with fewer training than validation pairs
    the validation head alone ranks better; the audit says so, and only then."""
    train, val, _ = _sets(n=100)  # 100 training pairs, 150 validation pairs
    with pytest.warns(UserWarning, match="weights='trusted_loss'"):
        auditor = Auditor(train, val, AuditArgs(batch_size=32))
    assert any("150 pairs" in w and "(100)" in w for w in auditor.input_warnings)  # audit.json
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 400 training pairs: no advice
        big, val, _ = _sets(n=400)
        Auditor(big, val, AuditArgs(batch_size=32))
        Auditor(big.subset(np.arange(101)), val, AuditArgs(batch_size=32))  # 150 / 101 < 1.5
        Auditor(train, val, AuditArgs(batch_size=32, weights="trusted_loss"))  # already chosen
    # the CLI says it once, in its summary (not also as a Python warning), and records it
    from ecif.audit.folder import read_audit
    from ecif.cli import main

    train.save(tmp_path / "train")
    val.save(tmp_path / "val")
    out = tmp_path / "audit"
    assert (
        main(["score", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "-o", str(out)])
        == 0
    )
    said = capsys.readouterr().err
    assert said.count("weights trusted_loss") == 1, said
    assert any("weights='trusted_loss'" in w for w in read_audit(out)[1]["warnings"])
