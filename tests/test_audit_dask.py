"""Dask scoring on a LocalCluster bound to 127.0.0.1: same outputs as local, survives a kill."""

import pickle
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from dask.distributed import Client, LocalCluster

import ecif.audit.shards as shards
from ecif.audit import AuditArgs
from ecif.audit.shards import score_shards
from ecif.data.row_reader import FolderRowReader
from ecif.engine import row_sums
from tests.dask_kill import killing_one_busy_worker
from tests.test_audit_copies import _copy_rows_across_parts
from tests.test_audit_shards import _folder

_score_parts = shards.score_parts


def held_score_parts(*args, **kwargs):
    """The shard task, held 3 s first so a worker is busy when the test kills it. A module
    function, so Dask's worker processes import it (and the real task) by name."""
    time.sleep(3)
    return _score_parts(*args, **kwargs)


def _scale_rows(folder):
    """Each stored row times a factor in [3, 5]: a folder of raw (unnormalised) features."""
    g = np.random.default_rng(0)
    for path in sorted(folder.glob("*_emb/*.npy")):
        a = np.load(path)
        np.save(path, (a * g.uniform(3, 5, (len(a), 1))).astype(a.dtype))


def _read(folder):
    files = sorted((folder / "scores").glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def test_dask_matches_local_and_survives_a_killed_worker(tmp_path, monkeypatch):
    folder, val = _folder(tmp_path, parts=4, rows=40)
    args = AuditArgs(batch_size=16, logit_scale=10.0, threshold=0.1)
    score_shards(folder, tmp_path / "local", val, args=args, log=lambda s: None)
    local = _read(tmp_path / "local")

    monkeypatch.setattr(shards, "score_parts", held_score_parts)
    cluster = LocalCluster(
        host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        with Client(cluster) as client, killing_one_busy_worker(client, poll=0.2) as killed:
            summary = score_shards(
                folder,
                tmp_path / "dask",
                val,
                args=args,
                distributor="dask",
                scheduler=cluster.scheduler_address,
                log=lambda s: None,
            )
    finally:
        cluster.close()
    assert killed, "no worker was busy to kill"
    assert summary["ok"].sum() == 159 and summary["failed"].sum() == 1
    dask = _read(tmp_path / "dask")
    assert list(dask["id"]) == list(local["id"])  # every row exactly once, in order
    pd.testing.assert_frame_equal(dask, local)
    assert not list((tmp_path / "dask" / "scores").glob(".*tmp"))


@pytest.mark.parametrize("norms", ["unit", "scaled"])
def test_folder_rows_read_on_a_worker_are_the_training_rows(tmp_path, norms):
    folder, _ = _folder(tmp_path, parts=3, rows=40)
    if norms == "scaled":  # raw features: every reader divides them by their norms alike
        _scale_rows(folder)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        train = shards.load_training_set(folder)
    assert any("not L2-normalised" in str(w.message) for w in said) == (norms == "scaled")
    ok = np.linalg.norm(np.asarray(train.image, dtype=np.float64), axis=1) > 0
    np.testing.assert_allclose(np.linalg.norm(train.image[ok], axis=1), 1.0, atol=2e-3)
    reader = FolderRowReader(folder)
    rows = np.array([118, 0, 45, 46, 80, 39])  # across parts, the failed row's neighbours
    x, y = pickle.loads(pickle.dumps(reader))(rows)
    np.testing.assert_array_equal(x, train.image[rows])
    np.testing.assert_array_equal(y, train.text[rows])
    with pytest.raises(IndexError, match="out of range"):
        reader(np.array([len(train)]))


@pytest.mark.parametrize("norms", ["unit", "scaled", "copies"])
def test_dask_fit_and_solve_give_the_local_scores_exactly(tmp_path, monkeypatch, norms):
    monkeypatch.setattr(row_sums, "BLOCK_BATCHES", 2)  # 8 batches: 4 blocks over 2 workers
    folder, val = _folder(tmp_path, parts=4, rows=40)
    if norms == "scaled":  # the workers read raw rows from the folder: rescaled there too
        _scale_rows(folder)
    if norms == "copies":  # rows of parts 2 and 3 copied from parts 0 and 1: in no batch
        _copy_rows_across_parts(folder)
    args = AuditArgs(batch_size=16, logit_scale=10.0, threshold=0.1, solver="cg")
    score_shards(folder, tmp_path / "local", val, args=args, log=lambda s: None)
    score_shards(folder, tmp_path / "dask", val, args=args, distributor="dask", log=lambda s: None)
    local, dask = _read(tmp_path / "local"), _read(tmp_path / "dask")
    pd.testing.assert_frame_equal(dask, local, check_exact=True)
    np.testing.assert_array_equal(
        np.load(tmp_path / "dask" / "w.npy"), np.load(tmp_path / "local" / "w.npy")
    )
