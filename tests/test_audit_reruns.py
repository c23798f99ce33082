"""A rerun of `ecif score` into an existing audit keeps only what it would write again: a
changed, added or reordered shard refits the head, so every shard is scored again (checked
against a fresh audit of the same inputs); score files of other inputs are refused."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from ecif.audit import AuditArgs
from ecif.audit.checks import AuditInputError
from ecif.audit.shards import load_training_set, score_shards
from ecif.data import layout
from ecif.data.folder_reader import read_part
from tests.test_audit_shards import _folder

ARGS = AuditArgs(batch_size=16, logit_scale=10.0, lam=1e-3, threshold=0.1)
COLUMNS = ["id", "pair_loss", "influence", "misalign_score", "is_misaligned", "rank"]


def _score(folder, out, val):
    return score_shards(folder, out, val, args=ARGS, log=lambda s: None)


def _table(out):
    files = sorted((out / "scores").glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)[COLUMNS]


def _same_as_fresh(folder, out, val, tmp_path):
    fresh = tmp_path / "fresh"
    shutil.rmtree(fresh, ignore_errors=True)
    _score(folder, fresh, val)
    pd.testing.assert_frame_equal(_table(out), _table(fresh), rtol=1e-5, atol=1e-7)


def _rewrite_part(folder, k, change):
    img, txt, meta = read_part(folder, k)
    img, txt = np.array(img), np.array(txt)
    change(img, txt, meta)
    layout.write_part(folder, k, img, txt, meta, {"source": f"{k:05d}.parquet"})


def test_a_changed_shard_rescores_every_shard(tmp_path):
    folder, val = _folder(tmp_path)
    out = tmp_path / "audit"
    _score(folder, out, val)
    before = _table(out)

    def swap_captions(img, txt, meta):  # the same rows, captions shuffled
        txt[:] = txt[np.random.default_rng(0).permutation(len(txt))]

    _rewrite_part(folder, 2, swap_captions)
    summary = _score(folder, out, val)
    assert summary["skipped"].sum() == 0
    # shard 0 is unchanged, but its scores come from the refit head
    assert not np.allclose(_table(out)["pair_loss"][:60], before["pair_loss"][:60])
    _same_as_fresh(folder, out, val, tmp_path)


def test_an_added_or_reordered_shard_rescores_every_shard(tmp_path):
    folder, val = _folder(tmp_path, parts=2)
    out = tmp_path / "audit"
    _score(folder, out, val)
    extra, _ = _folder(tmp_path / "more", parts=3)  # its third part joins the first folder
    img, txt, meta = read_part(extra, 2)
    layout.write_part(folder, 2, np.array(img), np.array(txt), meta, {"source": "00002.parquet"})
    assert _score(folder, out, val)["skipped"].sum() == 0
    _same_as_fresh(folder, out, val, tmp_path)

    # the same three parts in another order: batches are row positions, so the head differs
    parts = [read_part(folder, k) for k in range(3)]
    for k, (img, txt, meta) in zip(range(3), reversed(parts)):
        source = f"{2 - k:05d}.parquet"
        layout.write_part(folder, k, np.array(img), np.array(txt), meta, {"source": source})
    manifest = layout.read_manifest(folder)
    manifest["parts"] = [{"index": k, "source": f"/in/{2 - k:05d}.parquet"} for k in range(3)]
    layout.write_manifest(folder, manifest)
    assert _score(folder, out, val)["skipped"].sum() == 0
    _same_as_fresh(folder, out, val, tmp_path)


def test_an_unchanged_rerun_still_resumes(tmp_path):
    folder, val = _folder(tmp_path)
    out = tmp_path / "audit"
    _score(folder, out, val)
    first = _table(out)
    (out / "scores" / "00001.parquet").unlink()  # as if interrupted before its last shard
    summary = _score(folder, out, val)
    assert summary["skipped"].sum() == 2
    pd.testing.assert_frame_equal(_table(out), first)


def test_score_files_of_other_inputs_are_refused_before_the_fit(tmp_path):
    folder, val = _folder(tmp_path)
    out = tmp_path / "audit"
    _score(folder, out, val)
    small, _ = _folder(tmp_path / "small", parts=1)
    before = {f.name: f.read_bytes() for f in (out / "scores").glob("*.parquet")}
    with pytest.raises(AuditInputError, match="2 score file.*00001.parquet, 00002.parquet"):
        _score(small, out, val)
    assert {f.name: f.read_bytes() for f in (out / "scores").glob("*.parquet")} == before


def test_two_inputs_with_one_stem_keep_both_shards(tmp_path):
    """Two crawls that each have a 00000.tar: one score file each, no row lost."""
    folder, val = _folder(tmp_path)
    manifest = layout.read_manifest(folder)
    names = ["/a/00000.tar", "/b/00000.tar", "/b/00001.tar"]
    manifest["parts"] = [{"index": k, "source": s} for k, s in enumerate(names)]
    layout.write_manifest(folder, manifest)
    out = tmp_path / "audit"
    _score(folder, out, val)
    files = sorted(f.name for f in (out / "scores").glob("*.parquet"))
    assert files == ["00000.part0.parquet", "00000.part1.parquet", "00001.parquet"]
    table = _table(out)
    assert len(table) == 180 and table["id"].is_unique
    assert _score(folder, out, val)["skipped"].sum() == 3


@pytest.mark.parametrize("clash", ["repeated", "int_and_text", "mixed_unique"])
def test_ids_that_repeat_across_shards_are_said_and_exported_as_positions(tmp_path, clash):
    """Keys unique in each shard but not across them (or 5 in one shard, "5" in another):
    the audit used row positions silently and the export wrote them under the input's own
    header, `key`. Unique ids of two types (text and int): a parquet export was a traceback."""
    import json
    import warnings

    from ecif.audit.export import export_audit
    from ecif.data.folder_reader import IdColumnWarning

    folder, val = _folder(tmp_path, parts=2)
    first = {"repeated": [f"p0-{i}" for i in range(60)], "mixed_unique": list(range(60))}
    second = {"int_and_text": [str(i) for i in range(60)]}
    _rewrite_part(
        folder, 1, lambda i, t, meta: meta.__setitem__("key", first.get(clash, range(60)))
    )
    if clash in second:
        _rewrite_part(folder, 0, lambda i, t, meta: meta.__setitem__("key", second[clash]))
    out = tmp_path / "audit"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _score(folder, out, val)
    said = [str(w.message) for w in caught if issubclass(w.category, IdColumnWarning)]
    info = json.loads((out / "audit.json").read_text())
    if clash == "mixed_unique":
        assert not said and info["source_id_column"] == "key"
        expected = sorted([f"p0-{i}" for i in range(60)] + [str(i) for i in range(60) if i != 7])
    else:
        assert said and "'key' is not unique" in said[0] and said[0] in info["warnings"]
        assert info["source_id_column"] is None
        expected = list(range(119))
    header = "key" if clash == "mixed_unique" else "position"
    for name in ("ids.csv", "ids.parquet"):
        export_audit(out, tmp_path / name, keep=1.0, fmt="ids")
        read = pd.read_csv if name.endswith("csv") else pd.read_parquet
        ids = read(
            tmp_path / name,
            **({"dtype": str} if clash == "mixed_unique" and name.endswith("csv") else {}),
        )
        assert list(ids.columns) == [header]
        assert sorted(ids[header]) == expected


def test_score_shards_takes_the_validation_folder_as_the_cli_does(tmp_path):
    """A path for ``val`` was an AttributeError ('str' object has no attribute 'd_image')."""
    folder, val = _folder(tmp_path)
    val.save(tmp_path / "val")
    from ecif.data.embedding_set import EmbeddingSet

    _score(folder, tmp_path / "from_set", EmbeddingSet.load(tmp_path / "val"))
    _score(folder, tmp_path / "from_path", str(tmp_path / "val"))
    pd.testing.assert_frame_equal(_table(tmp_path / "from_path"), _table(tmp_path / "from_set"))
    with pytest.raises(TypeError, match="val must be an EmbeddingSet or its folder"):
        _score(folder, tmp_path / "bad", [1, 2])


def test_a_one_pair_shard_shares_the_batches_of_its_neighbours(tmp_path):
    """A pair alone in its shard was alone in its batch: no negatives, pair_loss and
    influence exactly 0, ranked as the cleanest pair. Now its shard joins the next one's
    batches; its loss is checked against the InfoNCE of its batch computed here."""
    import torch

    from ecif.audit.folder import read_heads

    folder, val = _folder(tmp_path, parts=3)
    img, txt, meta = read_part(folder, 1)  # part 1 shrinks to its first row
    layout.write_part(
        folder, 1, np.array(img)[:1], np.array(txt)[:1], meta.iloc[:1], {"source": "00001.parquet"}
    )
    out = tmp_path / "audit"
    summary = _score(folder, out, val)
    assert summary["ok"].tolist() == [60, 1, 60]
    table = _table(out)
    lone = table[table["id"] == "p1-0"].iloc[0]
    assert lone["pair_loss"] > 0 and lone["influence"] != 0

    head = read_heads(out)[0]
    train = load_training_set(folder)
    pos = int(np.nonzero(train.ids == "p1-0")[0][0])
    batch = next(b[b >= 0] for b in head.partition.index if pos in b)
    assert len(batch) >= 8  # at least half a batch of 16
    x = torch.as_tensor(np.asarray(train.image)[batch], dtype=torch.float64)
    y = torch.as_tensor(np.asarray(train.text)[batch], dtype=torch.float64)
    s = head.logit_scale * x @ head.m.double() @ y.T
    i = int(np.nonzero(batch == pos)[0][0])
    want = -(torch.log_softmax(s, 1)[i, i] + torch.log_softmax(s, 0)[i, i])
    assert np.isclose(lone["pair_loss"], float(want), rtol=1e-4)
    from ecif.audit import Auditor  # the in-memory audit of the loaded folder: same batches

    mem = Auditor(train, val, ARGS).run()
    assert np.isclose(
        mem.loc[mem["id"] == "p1-0", "pair_loss"].iloc[0], lone["pair_loss"], rtol=1e-4
    )


def test_a_rerun_that_keeps_every_shard_flags_as_the_first_run(tmp_path):
    """The kept scores are thresholded with the noise rate the first run's planted probes
    implied (before, the rerun's sentence and count came from the mixture alone)."""
    folder, val = _folder(tmp_path, parts=4, rows=150, d=16)
    out, args = tmp_path / "audit", AuditArgs()  # auto threshold, probes on (600 pairs)
    score_shards(folder, out, val, args=args, log=lambda s: None)
    first, info = _table(out), json.loads((out / "audit.json").read_text())
    assert "planted probes" in info["threshold"]
    said = []
    score_shards(folder, out, val, args=args, log=said.append)
    assert "only the threshold is applied again" in said[0]
    again = json.loads((out / "audit.json").read_text())
    assert (again["threshold"], again["flagged"]) == (info["threshold"], info["flagged"])
    pd.testing.assert_frame_equal(_table(out), first)
