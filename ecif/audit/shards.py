"""Batch scoring of an embedding folder, one output shard per input shard.

The head and w = H^-1 g_val are computed once; each shard is then scored on its own (batches
never cross shards, except runs of shards smaller than half a batch, scored together), so
shards can run as independent tasks (in-process or one Dask task each) and the scores equal
those of the concatenated set. Outputs are written atomically
and named after their input shard: a rerun skips finished shards. A final pass flags and
ranks across all shards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

import ecif.api as api
from ecif._version import __version__
from ecif.atomic import read_parquet_meta, write_parquet_atomic
from ecif.audit.audit_args import AuditArgs
from ecif.audit.auditor import Auditor, clip_scores
from ecif.audit.checks import check_options, check_training, check_validation, check_weights
from ecif.audit.combine import CONSENSUS, SIGNALS, VALIDATED_SIGNALS
from ecif.audit.folder import write_audit_description
from ecif.audit.model_signals import model_inputs
from ecif.audit.probes import TWIN_MAX_ROWS, probe_signals
from ecif.audit.recorded import merged, recording_warnings
from ecif.audit.reruns import check_no_stale_scores, earlier_run, output_names, reusable
from ecif.audit.shard_tables import ID, finalize, ok_rows, shard_frame, write_from_table
from ecif.data import layout
from ecif.data.embedding_set import EmbeddingSet, fingerprint
from ecif.data.folder_reader import IdColumnWarning, read_folder, read_part
from ecif.data.norms import UnnormalisedRowsWarning
from ecif.data.row_reader import FolderRowReader
from ecif.distributed import open_client, run_tasks
from ecif.engine.batches import Partition
from ecif.engine.cluster_rows import ClusterRows
from ecif.engine.head import Head
from ecif.engine.influence import score_pass
from ecif.progress import step

_log = logging.getLogger(__name__)


@dataclass
class PartInfo:
    index: int
    source: str  # input shard the part was embedded from
    rows: int
    output_name: str = ""  # its score file: the input's stem (``reruns.output_names``)

    def __post_init__(self) -> None:
        if not self.output_name:
            self.output_name = output_names([self.source], [self.index])[0]


def list_embedding_parts(folder: str | os.PathLike) -> list[PartInfo]:
    folder = Path(folder)
    if not folder.is_dir():
        raise layout.FolderError(f"{folder}: no such folder")
    manifest = layout.read_manifest(folder) or {}
    sources = {p["index"]: p.get("source", "") for p in manifest.get("parts", [])}
    out = []
    for k in layout.list_parts(folder):
        meta_p = layout.part_paths(folder, k)[2]
        source = sources.get(k) or layout.part_kv(meta_p).get("source") or f"part_{k}"
        out.append(PartInfo(index=k, source=str(source), rows=pq.read_metadata(meta_p).num_rows))
    names = output_names([p.source for p in out], [p.index for p in out])
    for p, name in zip(out, names):
        p.output_name = name
    if not out:
        raise layout.FolderError(
            f"{folder}: no metadata/metadata_{{N}}.parquet parts; not an embedding folder"
        )
    return out


def load_training_set(folder: str | os.PathLike, id_col: str | None = None) -> EmbeddingSet:
    """All usable rows of an embedding folder in float32, with a ``part`` column (for
    shard-local batches). Rows and ids follow ``ecif.data.folder_reader``, as in
    ``EmbeddingSet.load``."""
    return _training_set(folder, id_col)[0]


def _training_set(folder: str | os.PathLike, id_col: str | None) -> tuple[EmbeddingSet, str | None]:
    """(training set, its id column in the metadata or None for row positions)."""
    rows = read_folder(folder, id_col=id_col, dtype=np.float32)
    meta = rows.metadata.copy()
    if "status" not in meta:
        meta["status"] = "ok"
    meta["part"] = rows.part
    es = EmbeddingSet(rows.image, rows.text, ids=rows.ids, metadata=meta)
    es.logit_scale = (rows.manifest or {}).get("logit_scale")
    es.source = str(Path(folder).resolve())  # its rows are the folder reader's (as_unit)
    return es, rows.id_column


def _local_partition(head: Head, global_rows: np.ndarray) -> Partition:
    """The head's batches that lie in one shard, re-indexed to that shard's ok rows."""
    pos = np.full(head.partition.n, -1, dtype=np.int64)
    pos[global_rows] = np.arange(len(global_rows))
    idx = head.partition.index
    in_part = ((idx >= 0) & (pos[np.maximum(idx, 0)] >= 0)).any(axis=1)
    sub = idx[in_part]
    local = np.where(sub >= 0, pos[np.maximum(sub, 0)], -1)
    return Partition(
        index=local,
        batch_size=head.partition.batch_size,
        seed=head.partition.seed,
        n=len(global_rows),
    )


def score_parts(
    folder: str | os.PathLike,
    parts: list[PartInfo],
    head_state: dict,
    w: np.ndarray,
    global_rows: np.ndarray,
    out_paths: list[str | os.PathLike],
    meta: dict[str, Any],
    neg: str = "exact",
    id_col: str | None = "key",
    trusted_state: dict | None = None,
    consensus: np.ndarray | None = None,
) -> list[dict[str, int]]:
    """Score shards whose batches lie among them (one shard, or a few small ones that share
    batches: ``part_blocks``) with a broadcast head and w; write each shard's output
    atomically. Pure of globals. ``global_rows``: the shards' usable rows in the training
    set, in order; ``id_col``: the input's id column (None: ids are those positions).
    ``trusted_state``: the head fit on the validation pairs alone (``trusted_loss``);
    ``consensus``: the rows' ``knn_disagreement``, computed over the whole set."""
    head = Head.from_state_dict(head_state)
    read = [read_part(Path(folder), p.index) for p in parts]
    keeps = [ok_rows(pmeta) for _, _, pmeta in read]
    x = np.concatenate(
        [np.asarray(img[k], dtype=np.float32) for (img, _, _), k in zip(read, keeps)]
    )
    y = np.concatenate(
        [np.asarray(txt[k], dtype=np.float32) for (_, txt, _), k in zip(read, keeps)]
    )
    local_head = replace(head, partition=_local_partition(head, global_rows))
    d_pos, d_neg = score_pass(
        local_head, x, y, torch.from_numpy(np.asarray(w)).to(head.dtype), neg=neg
    )
    scores = {
        "clip_score": clip_scores(EmbeddingSet(x, y, check_finite=False)),
        "pair_loss": api.pair_losses(local_head, (x, y)),
        "influence": (d_pos + d_neg) / head.n_norm,
        "influence_pos": d_pos / head.n_norm,
        "influence_neg": d_neg / head.n_norm,
        "misalign_score": np.full(len(x), np.nan),  # combined across all shards in _finalize
    }
    if trusted_state is not None:  # in the same batches as the head's
        trusted = replace(Head.from_state_dict(trusted_state), partition=local_head.partition)
        scores["trusted_loss"] = api.pair_losses(trusted, (x, y))
    if consensus is not None:
        scores[CONSENSUS] = consensus
    done, start = [], 0
    for p, (_, _, pmeta), keep, out_path in zip(parts, read, keeps, out_paths):
        sl = slice(start, start + len(keep))
        mine = {name: np.asarray(v)[sl] for name, v in scores.items()}
        out = shard_frame(pmeta, keep, id_col, mine, global_rows[sl])
        write_parquet_atomic(Path(out_path), out, {**meta, "source": p.source})
        done.append({"ok": int(len(keep)), "failed": int(len(pmeta) - len(keep))})
        start += len(keep)
    return done


def part_blocks(head: Head, part_of_row: np.ndarray) -> list[list[int]]:
    """The parts (embedding part numbers) whose batches lie among them, in order: each shard
    alone, except small shards that ``make_partition`` joined to their neighbours."""
    idx = head.partition.index
    parent: dict[int, int] = {int(k): int(k) for k in pd.unique(part_of_row)}

    def root(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    for batch in idx:
        members = pd.unique(part_of_row[batch[batch >= 0]])
        for k in members[1:]:
            parent[root(int(k))] = root(int(members[0]))
    blocks: dict[int, list[int]] = {}
    for k in parent:
        blocks.setdefault(root(k), []).append(k)
    return list(blocks.values())


def score_shards(
    embeddings: str | os.PathLike,
    output_dir: str | os.PathLike,
    val: EmbeddingSet | str | os.PathLike | None = None,
    *,
    args: AuditArgs | None = None,
    distributor: str = "local",
    scheduler: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    allow_model_mismatch: bool = False,
) -> pd.DataFrame:
    """Score every shard of an embedding folder into ``output_dir/scores/<shard>.parquet``.

    Returns a summary DataFrame (one row per shard: name, ok, failed, skipped).
    ``distributor``: "local" (in-process) or "dask" (one task per shard; ``scheduler`` is a
    ``tcp://host:port`` address, or None for a LocalCluster on 127.0.0.1). The options, the
    validation set's widths and embedding model (``allow_model_mismatch``) and the number of
    usable pairs are checked before the fit; nothing is written when they fail
    (``ecif.audit.checks.AuditInputError``). ``log``: where the closing line goes (default:
    this module's logger, at INFO). Score tables name their id column ``id``; the input's own
    name is ``source_id_column`` in the metadata and audit.json.
    """
    args = args or AuditArgs()
    embeddings, out = Path(embeddings), Path(output_dir)
    read_notes: list[str] = []  # what reading the inputs found: kept in the metadata
    if isinstance(val, (str, os.PathLike)):  # a folder, as the CLI's --val takes
        with recording_warnings(categories=(UnnormalisedRowsWarning,)) as read_notes:
            val = EmbeddingSet.load(val)
    elif val is not None and not isinstance(val, EmbeddingSet):
        raise TypeError(f"val must be an EmbeddingSet or its folder; got {type(val).__name__}")
    check_options(args)
    check_weights(args.weights, val is not None, args.params)
    parts = list_embedding_parts(embeddings)
    check_no_stale_scores(out, [p.output_name for p in parts])
    manifest = layout.read_manifest(embeddings) or {}
    with recording_warnings(categories=(IdColumnWarning, UnnormalisedRowsWarning)) as found:
        train, id_col = _training_set(embeddings, None)
    read_notes = [*found, *read_notes]
    check_training(train, embeddings, sum(p.rows for p in parts) - len(train))
    meta = {
        "model": manifest.get("model"),
        "pretrained": manifest.get("pretrained"),
        "method": "ecif",
        "ecif_version": __version__,
        "id_column": ID,
        "source_id_column": id_col,
    }
    if val is not None:
        mismatch = check_validation(
            train,
            val,
            layout.model_identity(manifest),
            allow_model_mismatch=allow_model_mismatch,
        )
        meta["validation"] = f"validation set ({len(val)} pairs)"
        meta["validation_embeddings"] = val.source
        meta["validation_model"] = val.model
        if mismatch:
            meta["warnings"] = [mismatch]
    meta["options"] = args.record()
    meta["fingerprint"] = {  # what a rerun must find unchanged to keep a finished shard
        "train": fingerprint(train, train.metadata["part"].to_numpy()),
        "validation": fingerprint(val),
    }
    meta["signals"] = [*SIGNALS, *VALIDATED_SIGNALS] if val is not None else list(SIGNALS)
    auditor = Auditor(train, val, args, **model_inputs(args, embeddings, val))
    meta["copies"] = auditor.copies.count if auditor.copies else 0  # rows given a pair's scores
    if auditor.input_warnings or read_notes:
        meta["warnings"] = merged(meta.get("warnings"), [*read_notes, *auditor.input_warnings])
    rescore = True  # False: the shards' misalign_score is an earlier run's, kept
    with recording_warnings() as found:  # the engine's: kept in meta, so in every file
        meta["head_choice"] = auditor.choose().record()
        if val is None or args.params != "head":  # the whole set at once: in-process
            with step(
                f"fitting and scoring {len(train):,} pairs without a validation set", progress
            ):
                table = auditor.run(progress=progress)
            heads = auditor.heads
            skip = ("threshold", "flagged", "warnings")  # warnings: meta has them, and more
            meta.update({k: v for k, v in table.attrs.items() if k not in skip})
            meta["n_norm"] = float(np.mean([h.n_norm for h in heads]))
            meta["options"] = args.record()
            scores_dir = out / "scores"
            summary = write_from_table(embeddings, parts, train, table, scores_dir, meta, id_col)
            probes = auditor.probes
        elif (earlier := earlier_run(out, parts, meta, len(train))) is not None:
            # every shard holds what this run would write: keep its head, w and signal weights
            heads, old = earlier
            (log or _log.info)(
                f"all {len(parts)} shards of {out} are from an earlier run with the same options: "
                "its head, w and signal weights are kept; only the threshold is applied again"
            )
            meta.update(n_norm=old["n_norm"], fit=old.get("fit"), combination=old["combination"])
            meta["warnings"] = merged(meta.get("warnings"), old.get("warnings"))
            scores_dir, probes, rescore = out / "scores", None, False
            summary = _run_jobs([([p], None) for p in parts], None, progress)
        else:
            with _cluster(distributor, scheduler, train, embeddings) as (client, rows):
                where = " on the cluster" if rows is not None else ""
                with step(f"fitting the head on {len(train):,} pairs{where}", progress):
                    head = auditor.fit_head(
                        train, progress=progress, rows=rows, members=auditor.fit_members()
                    )
                heads = [head]
                meta["n_norm"] = head.n_norm
                with step("fitting the trusted head on the validation pairs", progress):
                    trusted_state = auditor.fit_trusted_head().state_dict()
                distinct = auditor.distinct_rows()
                with step(f"kNN consensus of {len(distinct):,} pairs", progress):
                    disagreement, near = auditor.pairs_consensus(progress)
                if len(distinct) <= TWIN_MAX_ROWS:  # the twin holds every pair: it needs no queries
                    near = None  # and the indexes (a copy of the embeddings) go before scoring
                g = api.loss_gradient(head, val)
                with step(f"solving w = H^-1 g_val (the validation direction){where}", progress):
                    inv = api.solver(head, train, args.solver_args(), rows=rows)
                    w = inv.solve(g).cpu().numpy()
                if rows is not None:
                    rows.close()  # the blocks go; the shards are scored one task each
                meta["fit"] = [dict(head.info)]
                scores_dir = out / "scores"
                scores_dir.mkdir(parents=True, exist_ok=True)
                np.save(out / "w.npy", w)  # H^-1 g_val: lets the app break scores down per member
                jobs = []
                part_col = train.metadata["part"].to_numpy()
                by_index = {p.index: p for p in parts}
                blocks = part_blocks(head, part_col)
                scored = {k for block in blocks for k in block}
                blocks += [[p.index] for p in parts if p.index not in scored]  # all rows failed
                for block in sorted(blocks):
                    ps = [by_index[k] for k in block]
                    targets = [scores_dir / p.output_name for p in ps]
                    if all(
                        t.exists() and reusable(read_parquet_meta(t), p.source, meta)
                        for p, t in zip(ps, targets)
                    ):
                        jobs.append((ps, None))
                        continue
                    rows_b = np.nonzero(np.isin(part_col, block))[0]
                    job = (embeddings, ps, head.state_dict(), w, rows_b, targets, meta)
                    job += (args.neg, id_col, trusted_state, disagreement[rows_b])
                    jobs.append((ps, job))
                summary = _run_jobs(jobs, client, progress)
            probes = None
            if args.weights == "auto":
                with step("weighing the signals: a twin audit with planted probes", progress):
                    probes = probe_signals(
                        auditor, args.probes, progress=progress, consensus=disagreement, near=near
                    )
    meta["warnings"] = merged(meta.get("warnings"), found)
    names = [p.output_name for p in parts]
    finalize(
        scores_dir,
        args.threshold,
        meta,
        probes,
        rescore=rescore,
        copies=auditor.copies,
        names=names,
    )
    write_audit_description(out, meta, heads, embeddings, summary, ID)
    s = summary.sum(numeric_only=True)
    (log or _log.info)(
        f"scored: ok={int(s['ok'])} failed={int(s['failed'])} skipped shards={int(s['skipped'])} -> {out}"
    )
    return summary


@contextmanager
def _cluster(distributor: str, scheduler: str | None, train: EmbeddingSet, folder: Path):
    """(client, rows held by its workers) for a Dask run, else (None, None)."""
    if distributor == "local":
        yield None, None
    elif distributor == "dask":
        with open_client(scheduler) as client:
            loader = FolderRowReader(folder)  # workers read their blocks' rows themselves
            yield client, ClusterRows(client, train.image, train.text, loader=loader)
    else:
        raise ValueError(f"distributor must be 'local' or 'dask'; got {distributor!r}")


def _run_jobs(jobs, client: Any, progress: bool) -> pd.DataFrame:
    """Score the pending blocks of shards: here, or one Dask task each on ``client``
    (``_cluster`` has checked the distributor). ``jobs``: (parts, task args or None: kept)."""
    rows = []
    todo = [(ps, a) for ps, a in jobs if a is not None]
    for ps, a in jobs:
        if a is None:
            rows += [{"shard": p.output_name, "ok": 0, "failed": 0, "skipped": 1} for p in ps]
    if client is None:
        from tqdm.auto import tqdm

        results = [score_parts(*a) for _, a in tqdm(todo, desc="shards", disable=not progress)]
    else:
        results = run_tasks(score_parts, [a for _, a in todo], client=client)
    for (ps, _), res in zip(todo, results):
        rows += [{"shard": p.output_name, **r, "skipped": 0} for p, r in zip(ps, res)]
    out = pd.DataFrame(rows, columns=["shard", "ok", "failed", "skipped"])
    return out.sort_values("shard", kind="stable").reset_index(drop=True)
