"""The pairs an audit keeps, as a DataComp subset file or as an id list.

A DataComp subset file (the filtering track's input to ``resharder.py -s``) is a ``.npy``
holding a one-dimensional structured array of dtype ``np.dtype("u8,u8")``, one element per
kept sample, sorted: the 128-bit ``uid`` (32 hex digits) split as
``(int(uid[:16], 16), int(uid[16:32], 16))``. docs/formats.md describes both outputs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecif.atomic import atomic_path
from ecif.audit.folder import AuditFolderError, read_audit

UID_DTYPE = np.dtype("u8,u8")
FORMATS = ("datacomp", "ids")
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


class ExportError(ValueError):
    """An export that cannot be made; the message says why and what to do."""


def is_uid(value: Any) -> bool:
    """A DataComp uid: a string of exactly 32 hex digits."""
    return isinstance(value, str) and bool(_HEX32.match(value))


def uids_to_array(uids: Iterable[str]) -> np.ndarray:
    """32-hex uids -> the sorted ``u8,u8`` array DataComp reads (duplicates kept once)."""
    uids = list(uids)
    bad = [u for u in uids if not is_uid(u)]
    if bad:
        raise ExportError(f"{len(bad)} of {len(uids)} uids are not 32 hex digits (e.g. {bad[0]!r})")
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], dtype=UID_DTYPE)
    return np.unique(arr)  # sorted lexicographically by (f0, f1), as DataComp requires


def array_to_uids(arr: np.ndarray) -> list[str]:
    """The inverse of ``uids_to_array``: lower-case 32-hex strings, in the array's order."""
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in arr.tolist()]


def write_subset_file(uids: Iterable[str], path: str | os.PathLike) -> Path:
    """Write a DataComp subset file (``.npy``) atomically; returns its path."""
    path = Path(path)
    arr = uids_to_array(uids)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    return path


def read_subset_file(path: str | os.PathLike) -> np.ndarray:
    """A DataComp subset file, checked: one-dimensional, dtype ``u8,u8``, sorted."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype != UID_DTYPE or arr.ndim != 1:
        raise ExportError(f"{path}: dtype {arr.dtype}, shape {arr.shape}; want 1-d {UID_DTYPE}")
    hi, lo = arr["f0"], arr["f1"]
    if (
        len(arr) > 1
        and not ((hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))).all()
    ):
        raise ExportError(f"{path}: the uids are not sorted")
    return arr


@dataclass
class ExportResult:
    """What an export kept and why the rest went."""

    path: Path
    format: str
    kept: int
    total: int
    dropped: int  # scored rows left out (flagged, or above the kept fraction)
    failed: int  # rows that were never scored (status != ok): never kept
    id_column: str
    ids: np.ndarray = field(repr=False)
    written: int | None = None  # datacomp: distinct uids in the file
    reason: str = "flagged"  # why the dropped rows went: "flagged" or "most suspicious"

    def summary(self) -> str:
        if self.format == "datacomp":
            what = f"{self.written} uids, DataComp subset file"
        else:
            what = f"{self.kept} ids in column {self.id_column!r}"
        return (
            f"export: kept {self.kept} of {self.total} rows; dropped {self.dropped} {self.reason}, "
            f"{self.failed} failed (never kept) -> {self.path} ({what})"
        )


def kept_mask(
    table: pd.DataFrame, keep: float | None = None, drop_flagged: bool = False
) -> np.ndarray:
    """Which rows of an audit table to keep: exactly one of ``keep`` (the least suspicious
    fraction of the scored rows, by ``rank``, else ``misalign_score``) and ``drop_flagged``
    (the scored rows not flagged). Rows that were not scored are never kept."""
    _check_choice(keep, drop_flagged)
    scored = _scored(table)
    if drop_flagged:
        if "is_misaligned" not in table:
            raise ExportError("the audit table has no is_misaligned column")
        return scored & ~table["is_misaligned"].fillna(False).to_numpy(dtype=bool)
    n_keep = int(round(float(keep) * scored.sum()))
    if "rank" in table:  # rank 1 = most suspicious: keep the largest ranks
        order = pd.to_numeric(table["rank"], errors="coerce").to_numpy(dtype=float)
    else:
        order = -table["misalign_score"].to_numpy(dtype=float)
    order = np.where(scored & np.isfinite(order), order, -np.inf)
    rows = np.argsort(-order, kind="stable")[:n_keep]
    mask = np.zeros(len(table), dtype=bool)
    mask[rows] = True
    return mask & scored


def _check_choice(keep: float | None, drop_flagged: bool) -> None:
    if (keep is None) == (not drop_flagged):
        raise ExportError("give exactly one of --keep FRACTION and --drop-flagged")
    if keep is not None and not 0.0 < float(keep) <= 1.0:
        raise ExportError(f"--keep must be a fraction in (0, 1]; got {keep}")


def _scored(table: pd.DataFrame) -> np.ndarray:
    ok = np.ones(len(table), dtype=bool)
    if "status" in table:
        ok &= (table["status"].astype(str) == "ok").to_numpy()
    if "misalign_score" in table:
        ok &= np.isfinite(table["misalign_score"].to_numpy(dtype=float))
    return ok


def source_id_column(info: dict[str, Any]) -> str:
    """The id column's name in the input data: the training embeddings' manifest, else the
    audit's ``source_id_column`` (the column ``ecif score`` took the ids from), else its
    ``id_column``."""
    from ecif.data import layout

    if "source_id_column" in info and info["source_id_column"] is None:
        return "position"  # ``ecif score`` found no unique id column: the ids are positions
    emb = info.get("embeddings")
    if emb and Path(emb).is_dir():
        name = (layout.read_manifest(emb) or {}).get("id_column")
        if name:
            return str(name)
    return str(info.get("source_id_column") or info.get("id_column") or "id")


def _uids(ids: np.ndarray, info: dict[str, Any], id_name: str) -> np.ndarray:
    """The 32-hex uid of each id: the ids themselves, or the embeddings' ``uid`` column."""
    bad = sum(not is_uid(v) for v in ids)
    if not bad:
        return ids
    lookup = _uid_lookup(info, id_name)
    if lookup is not None:
        mapped = pd.Series(ids).map(lookup)
        if mapped.notna().all() and all(is_uid(v) for v in mapped):
            return mapped.to_numpy()
    example = next(v for v in ids if not is_uid(v))
    raise ExportError(
        f"--format datacomp needs 32-hex DataComp uids; the id column {id_name!r} has {bad} "
        f"of {len(ids)} kept rows that are not (e.g. {example!r}) and the embeddings carry no "
        "uid column for them. Embed with --id-col uid, or use --format ids"
    )


def _uid_lookup(info: dict[str, Any], id_name: str) -> dict | None:
    """id -> uid from the training embeddings' metadata, when it has a ``uid`` column."""
    import pyarrow.parquet as pq

    from ecif.data import layout

    emb = info.get("embeddings")
    if not emb or not Path(emb).is_dir() or id_name == "uid":
        return None
    frames = []
    for k in layout.list_parts(emb):
        path = layout.part_paths(Path(emb), k)[2]
        cols = pq.read_schema(path).names
        if id_name in cols and "uid" in cols:
            frames.append(pd.read_parquet(path, columns=[id_name, "uid"]))
    if not frames:
        return None
    both = pd.concat(frames, ignore_index=True).drop_duplicates()
    if both[id_name].duplicated().any():
        return None  # an id with two uids: ambiguous
    return dict(zip(both[id_name], both["uid"]))


def export_audit(
    audit: str | os.PathLike,
    output: str | os.PathLike,
    *,
    keep: float | None = None,
    drop_flagged: bool = False,
    fmt: str = "datacomp",
) -> ExportResult:
    """Write the pairs an audit keeps: a DataComp subset ``.npy`` (``fmt="datacomp"``) or an
    id list (``fmt="ids"``: ``.csv``, or ``.parquet`` by suffix, one column named as the
    input's id column). Exactly one of ``keep`` (fraction) and ``drop_flagged``."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}; got {fmt!r}")
    output = Path(output)
    want = (".npy",) if fmt == "datacomp" else (".csv", ".parquet")
    if output.suffix not in want:
        raise ExportError(
            f"{output}: a {fmt} export is written as {' or '.join(want)}; name the output so"
        )
    _check_choice(keep, drop_flagged)
    inside = output.resolve()
    for kept in (Path(audit) / "scores", Path(audit) / "scores.parquet", Path(audit) / "index"):
        if inside == kept.resolve() or kept.resolve() in inside.parents:
            raise ExportError(
                f"{output}: inside the audit's own {kept.name}; it would overwrite the audit: "
                "write the export elsewhere"
            )
    table, info = _read(audit)
    mask = kept_mask(table, keep, drop_flagged)
    id_name = source_id_column(info)
    id_col = "id" if "id" in table else id_name
    if id_col not in table:
        raise ExportError(f"{audit}: the audit table has no id column ({id_name!r} or 'id')")
    ids = table[id_col].to_numpy()[mask]
    scored = _scored(table)
    result = ExportResult(
        output,
        fmt,
        int(mask.sum()),
        len(table),
        int(scored.sum() - mask.sum()),
        int((~scored).sum()),
        id_name,
        ids,
        reason="flagged" if drop_flagged else "most suspicious",
    )
    if fmt == "datacomp":
        uids = _uids(ids, info, id_name)
        write_subset_file(uids, output)
        result.written = len(set(uids))
    else:
        _write_ids(output, pd.DataFrame({id_name: ids}))
    return result


def _read(audit: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    try:
        return read_audit(audit)
    except AuditFolderError as e:
        raise ExportError(str(e)) from e


def _write_ids(path: Path, frame: pd.DataFrame) -> None:
    col = frame.columns[0]
    if frame[col].dtype == object and frame[col].map(type).nunique() > 1:
        frame = frame.astype({col: str})  # 1000 and "abc" from two shards: parquet needs one type
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
