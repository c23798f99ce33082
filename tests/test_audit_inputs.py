"""Embeddings that are not L2-normalised: the audit divides each row by its norm, as CLIP
compares them, and says so in the API, the CLI, the table's metadata and audit.json."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

import ecif
from ecif.audit.metrics import average_precision
from ecif.cli import main
from ecif.data.concepts import concept_pairs
from ecif.data.embedding_set import EmbeddingSetError

NOT_UNIT = "not L2-normalised"


def _sets(n=1000, seed=0):
    x, y, frame = concept_pairs(n, d=64, noise=0.2, noise_kind="mixed", seed=seed)
    vx, vy, _ = concept_pairs(300, d=64, noise=0.0, seed=seed + 100)
    train = ecif.EmbeddingSet(x, y, ids=frame["key"].to_numpy())
    return train, ecif.EmbeddingSet(vx, vy), frame["is_corrupted"].to_numpy()


def _scaled(es, seed):
    """The same pairs with each row's norm drawn from 0.7-1.3 (raw CLIP features vary so)."""
    rng = np.random.default_rng(seed)
    a, b = (rng.uniform(0.7, 1.3, (len(es), 1)) for _ in range(2))
    return ecif.EmbeddingSet(es.image * a, es.text * b, ids=es.ids)


def test_unit_rows_say_nothing_and_scaled_rows_warn_once_per_set():
    train, val, labels = _sets()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unit = ecif.Auditor(train, val).run()
    assert not [w for w in caught if NOT_UNIT in str(w.message)]
    assert unit.attrs["warnings"] == []
    with pytest.warns(UserWarning, match=f"training embeddings are {NOT_UNIT}") as caught:
        skewed = ecif.Auditor(_scaled(train, 1), val).run()
    assert len([w for w in caught if NOT_UNIT in str(w.message)]) == 1  # not again by the twin
    assert len(skewed.attrs["warnings"]) == 1 and "0.7" in skewed.attrs["warnings"][0]
    # rescaled, the rows are the unit ones again: the same ranking (unrescaled, these planted
    # pairs ranked at AP 0.705 against 0.753, a gap this test would catch)
    np.testing.assert_allclose(skewed["clip_score"], unit["clip_score"], atol=1e-5)
    ap_unit = average_precision(labels, unit["misalign_score"].to_numpy())
    ap_skewed = average_precision(labels, skewed["misalign_score"].to_numpy())
    assert abs(ap_skewed - ap_unit) < 0.005, (ap_skewed, ap_unit)
    rho = pd.Series(skewed["misalign_score"]).corr(unit["misalign_score"], method="spearman")
    assert rho > 0.99, rho
    with pytest.warns(UserWarning, match=f"validation embeddings are {NOT_UNIT}"):
        both = ecif.Auditor(_scaled(train, 1), _scaled(val, 2))
    assert len(both.input_warnings) == 2 and both.run().attrs["warnings"] == both.input_warnings


def test_ecif_score_records_and_prints_the_warning(tmp_path, capsys):
    train, val, _ = _sets(n=400, seed=3)
    _scaled(train, 4).save(tmp_path / "train")
    val.save(tmp_path / "val")
    out = tmp_path / "audit"
    argv = ["score", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "-o", str(out)]
    assert main([*argv, "--quiet"]) == 0
    said = capsys.readouterr().err  # once, as a line of the summary
    note = f"{tmp_path / 'train'}: embeddings are {NOT_UNIT}"
    assert said.count(f"warning: {note}") == 1, said
    assert "UserWarning" not in said
    info = json.loads((out / "audit.json").read_text())
    assert [w for w in info["warnings"] if w.startswith(note)]
    # a later verb says it once, as a line (it read the folder three times)
    assert main(["index", str(out)]) == 0
    said = capsys.readouterr().err
    assert said.count(f"warning: {note}") == 1 and "UnnormalisedRowsWarning" not in said, said
    # every later reader of the folder (trace, app, verify) sees the same unit rows
    with pytest.warns(UserWarning, match=NOT_UNIT):
        again = ecif.EmbeddingSet.load(tmp_path / "train")
    norms = np.linalg.norm(np.asarray(again.image, dtype=np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    from ecif.data.embedding_set import as_unit

    # read from a folder: the reader decided, part by part; an audit does not look again
    same, note = as_unit(again, "training")
    assert same is again and note is None
    table = pd.concat(pd.read_parquet(p) for p in sorted((out / "scores").glob("*.parquet")))
    assert len(table) == 400


def test_non_finite_rows_stop_the_audit_naming_both_sides_and_no_norm_warning(tmp_path, capsys):
    """A NaN image row and an inf text row (unit rows otherwise): ``ecif score`` stops before
    the fit with one message naming both sides' ids, and does not first call the folder
    "not L2-normalised" (the NaN norms used to count as off 1) or warn of an invalid divide."""
    train, _, _ = _sets(n=300, seed=5)
    image, text = np.array(train.image), np.array(train.text)
    image[5] = np.nan
    text[7, :3] = np.inf
    ecif.EmbeddingSet(image, text, ids=train.ids, check_finite=False).save(tmp_path / "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning while reading fails the test
        with pytest.raises(EmbeddingSetError) as err:
            ecif.EmbeddingSet.load(tmp_path / "train")
    said = str(err.value)
    assert "image embeddings in 1 rows" in said and "text embeddings in 1 rows" in said
    assert repr(train.ids[5]) in said and repr(train.ids[7]) in said, said
    argv = ["score", str(tmp_path / "train"), "-o", str(tmp_path / "audit"), "--quiet"]
    assert main(argv) == 2
    printed = capsys.readouterr().err
    assert NOT_UNIT not in printed and "invalid value" not in printed, printed
    assert "NaN or inf" in printed and not (tmp_path / "audit" / "scores").exists()
