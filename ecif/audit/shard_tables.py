"""The score tables of ``ecif score``: one output shard per input shard, then a pass that
combines the signals, flags and ranks across all of them (``ecif.audit.shards`` runs it).

Pure of fitting: these functions read and write parquet tables and apply the combination
(``ecif.audit.misalign``) and the threshold (``ecif.audit.thresholds``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ecif.atomic import read_parquet_meta, write_parquet_atomic
from ecif.audit.copies import Copies, distinct_positions, flags_of_rows
from ecif.audit.misalign import ProbeSignals, misalign_scores
from ecif.audit.recorded import merged
from ecif.audit.thresholds import flag_count
from ecif.audit.validation_noise import warn_if_noisy
from ecif.data.folder_reader import ok_mask, read_part

SCORE_COLUMNS = (
    "clip_score",
    "pair_loss",
    "trusted_loss",
    "knn_disagreement",
    "influence",
    "influence_pos",
    "influence_neg",
    "self_influence",
    "misalign_score",
)
ID = "id"  # the id column of every score table; the input's own name is in the metadata


def ok_rows(meta: pd.DataFrame) -> np.ndarray:
    """Positions of a part's usable rows (``ecif.data.folder_reader.ok_mask``)."""
    return np.nonzero(ok_mask(meta))[0]


def write_from_table(folder, parts, train, table, scores_dir, meta, id_col) -> pd.DataFrame:
    rows = []
    part_col = train.metadata["part"].to_numpy()
    for p in parts:
        _, _, pmeta = read_part(Path(folder), p.index)
        keep = ok_rows(pmeta)
        rows_p = np.nonzero(part_col == p.index)[0]
        sub = table.iloc[rows_p].reset_index(drop=True)
        cols = [c for c in SCORE_COLUMNS if c in sub]
        out = shard_frame(pmeta, keep, id_col, {c: sub[c].to_numpy() for c in cols}, rows_p)
        n = len(pmeta)
        write_parquet_atomic(scores_dir / p.output_name, out, {**meta, "source": p.source})
        rows.append(
            {"shard": p.output_name, "ok": len(keep), "failed": n - len(keep), "skipped": 0}
        )
    return pd.DataFrame(rows)


def shard_frame(
    pmeta: pd.DataFrame,
    keep: np.ndarray,
    id_col: str | None,
    scores: dict,
    rows: np.ndarray | None = None,
) -> pd.DataFrame:
    """One output row per input row: scores and status ``ok`` for the usable rows (``keep``),
    NaN and the input's status for the rest. The input's ``id_col`` becomes ``id``; without
    one, a usable row's id is its position among the folder's usable rows (``rows``, as in
    the training set) and the other rows' is null."""
    n = len(pmeta)
    if id_col is not None:
        ids = pmeta[id_col]
    else:
        ids = pd.array([pd.NA] * n, dtype="Int64")
        ids[keep] = np.arange(len(keep)) if rows is None else rows
    out = pd.DataFrame({ID: ids})
    out["caption"] = pmeta["caption"] if "caption" in pmeta else None
    for col, vals in scores.items():
        full = np.full(n, np.nan, dtype=np.float32)
        full[keep] = np.asarray(vals, dtype=np.float32)
        out[col] = full
    out["is_misaligned"] = False
    out["rank"] = pd.array([pd.NA] * n, dtype="Int64")
    status = pmeta["status"] if "status" in pmeta else pd.Series("ok", index=pmeta.index)
    status = status.astype(str).to_numpy(dtype=object)
    status[keep] = "ok"  # "success" (img2dataset's word) was scored too
    out["status"] = status
    out["error_message"] = pmeta["error_message"] if "error_message" in pmeta else None
    return out


def finalize(
    scores_dir: Path,
    threshold,
    meta: dict,
    probes: ProbeSignals | None = None,
    *,
    rescore: bool = True,
    copies: Copies | None = None,
    names: list[str] | None = None,
) -> None:
    """Combine the signals into misalign_score, flag and rank across all shards, then rewrite
    each shard atomically. The standardisation and the weights are global (audit.json);
    ``probes``: the twin audit that weighs the signals (``ecif.audit.probes``). ``rescore``
    False: the shards' misalign_score (an earlier run's, ``meta["combination"]``) is kept and
    only the threshold is applied again. ``copies``: the training set's exact copies (over its
    usable rows, in the order of ``names``: the shards' files): each takes its pair's
    signals, and the combination and threshold count each pair once."""
    files = [scores_dir / n for n in names] if names else sorted(scores_dir.glob("*.parquet"))
    signals = [c for c in SCORE_COLUMNS if c != "misalign_score"]
    frames = []
    for f in files:
        have = set(pq.read_schema(f).names)
        want = ["misalign_score", "status", *signals]
        frames.append(pd.read_parquet(f, columns=[c for c in want if c in have]))
    table = pd.concat(frames, ignore_index=True)
    rows = rows_copies(table, copies)
    if rows is not None:  # the copies' signals are NaN until here: each takes its pair's
        table = rows.spread_frame(table, keep=("status", "misalign_score"))
    pairs = table.iloc[distinct_positions(rows, len(table))].reset_index(drop=True)
    mode = (meta.get("options") or {}).get("weights", "auto")
    n_norm = float(meta.get("n_norm") or 1.0)
    if rescore:
        score, meta["combination"], rate = misalign_scores(pairs, mode, n_norm, probes)
        if note := warn_if_noisy(meta["combination"]):
            meta["warnings"] = merged(meta.get("warnings"), [note])
    else:  # the kept scores; their noise rate counted with the earlier run's probes
        score = pairs["misalign_score"].to_numpy(np.float64)
        earlier = meta.get("combination") or {}  # the earlier run's probes' counts
        rate = misalign_scores(
            pairs,
            mode,
            n_norm,
            probe_rate=earlier.get("probe_rate"),
            shuffled_rate=earlier.get("shuffled_probe_rate"),
        )[2]
    score = score.astype(np.float32).astype(np.float64)  # rank what the tables hold
    count, how = flag_count(score, threshold, rate)
    allv, rank, flag = flags_of_rows(rows, score, count)
    finite = np.isfinite(allv)
    flagged = int(count if rows is None else (flag & finite).sum())
    meta.update(threshold=how, flagged=flagged, flagged_pairs=int(min(count, flagged)))
    meta["options"] = {**meta.get("options", {}), "threshold": threshold}
    start = 0
    for f, part in zip(files, frames):
        df = pd.read_parquet(f)
        sl = slice(start, start + len(part))
        if rows is not None:
            for col in signals:
                if col in df:
                    df[col] = table[col].to_numpy(np.float32)[sl]
        df["misalign_score"] = allv[sl].astype(np.float32)
        df["is_misaligned"] = flag[sl] & finite[sl]
        df["rank"] = pd.array(np.where(finite[sl], rank[sl], -1), dtype="Int64")
        df.loc[~finite[sl], "rank"] = pd.NA
        old = read_parquet_meta(f)  # one truth: the options of the run that flagged
        write_parquet_atomic(f, df, {**old, **meta, "source": old.get("source")})
        start += len(part)


def rows_copies(table: pd.DataFrame, copies: Copies | None) -> Copies | None:
    """``copies`` (over the usable rows) as copies over every row of the shards' tables, in
    which the usable rows are those of status ``ok``, in training order."""
    if copies is None:
        return None
    ok = np.flatnonzero(table["status"].astype(str).to_numpy() == "ok")
    if len(ok) != len(copies.first):
        raise ValueError(
            f"the score tables hold {len(ok)} scored rows, the training set {len(copies.first)}"
        )
    first = np.arange(len(table))
    first[ok] = ok[copies.first]
    return Copies(first)
