"""The app's logic without Streamlit: filtering, paging, review marks, exports, images.

Kept apart from the pages so it can be tested directly and stays vectorised (no per-row
Python over the whole table): a 100k-pair audit is filtered and sorted in pandas, and only
the rows on screen have their images read, one row group of one source shard at a time.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecif.atomic import atomic_path
from ecif.audit.folder import AuditFolderError, read_audit

AUDIT_ENV = "ECIF_AUDIT"
DATA_ROOT_ENV = "ECIF_DATA_ROOT"  # `ecif app --data-root`: where the input shards are now
REVIEWED_FILE = "reviewed.parquet"
# sortable columns -> descending puts the most suspicious first (the toggle follows the column)
SUSPICIOUS_FIRST_DESCENDING = {
    "rank": False,
    "misalign_score": True,
    "influence": False,
    "influence_pos": False,
    "influence_neg": False,
    "clip_score": False,
    "self_influence": True,
}
SORTABLE = tuple(SUSPICIOUS_FIRST_DESCENDING)
# shown in image cells whose thumbnail cannot be read (instead of the text "None")
MISSING_IMAGE = (
    "data:image/svg+xml;base64,"
    + base64.b64encode(
        b'<svg xmlns="http://www.w3.org/2000/svg" width="96" height="96"><rect width="96" '
        b'height="96" fill="#eee"/><text x="48" y="52" font-family="sans-serif" font-size="13" '
        b'fill="#888" text-anchor="middle">no image</text></svg>'
    ).decode()
)


def audit_stamp(folder: str | os.PathLike) -> float:
    """A number that changes when the audit is rewritten (cache key for the table)."""
    folder = Path(folder)
    paths = [folder / "audit.json", folder / "scores.parquet", folder / "scores"]
    return sum(p.stat().st_mtime for p in paths if p.exists())


def load_audit(folder: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The audit table (id column named ``id``) with a ``flag`` text column for charts."""
    table, info = read_audit(folder)
    if table.empty:
        raise AuditFolderError(f"{folder}: the audit has no rows (nothing was scored)")
    missing = [c for c in ("id", "misalign_score", "is_misaligned") if c not in table]
    if missing:
        raise AuditFolderError(f"{folder}: the score table lacks columns {missing}")
    if "rank" not in table:
        table["rank"] = table["misalign_score"].rank(ascending=False, method="first")
    table["is_misaligned"] = table["is_misaligned"].fillna(False).astype(bool)
    table["flag"] = np.where(table["is_misaligned"], "flagged", "not flagged")
    if "status" not in table:
        table["status"] = "ok"
    return table, info


# -- filtering and paging ------------------------------------------------------------------
@dataclass
class Filters:
    flagged_only: bool = False
    min_score: float | None = None
    text: str = ""
    status: str = "ok"  # "ok", "failed" (anything but ok) or "all"
    review: str = "all"  # "all", "unreviewed", "reviewed"


def filter_table(table: pd.DataFrame, f: Filters, reviewed: pd.Index | None = None) -> pd.DataFrame:
    """The rows that pass the filters (vectorised; the table is not copied when all pass)."""
    keep = np.ones(len(table), dtype=bool)
    if f.flagged_only:
        keep &= table["is_misaligned"].to_numpy()
    if f.min_score is not None:
        keep &= (table["misalign_score"] >= f.min_score).to_numpy()
    if f.text.strip() and "caption" in table:
        keep &= table["caption"].astype(str).str.contains(f.text.strip(), case=False, regex=False)
    if f.status == "ok":
        keep &= (table["status"].astype(str) == "ok").to_numpy()
    elif f.status == "failed":
        keep &= (table["status"].astype(str) != "ok").to_numpy()
    if f.review != "all":
        done = table["id"].isin(reviewed if reviewed is not None else []).to_numpy()
        keep &= done if f.review == "reviewed" else ~done
    return table if keep.all() else table[keep]


def sort_page(
    table: pd.DataFrame, by: str, ascending: bool, page: int, page_size: int
) -> pd.DataFrame:
    """One page (1-based) of the table sorted by ``by``; argpartition-free but O(n log n) once.
    Missing values (unscored rows) come last either way, not above rank 1."""
    col = table[by].reset_index(drop=True)
    order = col.sort_values(ascending=ascending, kind="stable", na_position="last").index
    start = (max(page, 1) - 1) * page_size
    return table.iloc[order[start : start + page_size]]


def num_pages(n: int, page_size: int) -> int:
    return max(1, -(-n // page_size))


# -- review marks and exports ----------------------------------------------------------------
def read_reviewed(folder: str | os.PathLike) -> pd.DataFrame:
    """AUDIT/reviewed.parquet: one row per reviewed id with the time it was marked."""
    path = Path(folder) / REVIEWED_FILE
    if not path.exists():
        return pd.DataFrame({"id": pd.Series(dtype=object), "reviewed_at": pd.Series(dtype=str)})
    return pd.read_parquet(path)


def mark_reviewed(folder: str | os.PathLike, ids: Sequence[Any]) -> int:
    """Add ids to AUDIT/reviewed.parquet (atomic rewrite); returns how many were new."""
    old = read_reviewed(folder)
    new = [i for i in dict.fromkeys(ids) if i not in set(old["id"].tolist())]
    if not new:
        return 0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    add = pd.DataFrame({"id": new, "reviewed_at": [stamp] * len(new)})
    out = pd.concat([old, add], ignore_index=True) if len(old) else add
    path = Path(folder) / REVIEWED_FILE
    with atomic_path(path) as tmp:
        out.to_parquet(tmp, index=False)
    return len(new)


def ids_bytes(ids: Sequence[Any], fmt: str, id_name: str = "id") -> bytes:
    """The ids as a one-column CSV or parquet file, for download or writing."""
    df = pd.DataFrame({id_name: list(ids)})
    if fmt == "parquet":
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return buf.getvalue()
    return df.to_csv(index=False).encode()


def export_ids(
    folder: str | os.PathLike, ids: Sequence[Any], fmt: str, id_name: str = "id"
) -> Path:
    """Write the ids to AUDIT/exports/selected_ids_<time>.<fmt> and return the path."""
    out = Path(folder) / "exports"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"selected_ids_{time.strftime('%Y%m%d-%H%M%S')}.{fmt}"
    n = 1
    while path.exists():
        path = out / f"selected_ids_{time.strftime('%Y%m%d-%H%M%S')}_{n}.{fmt}"
        n += 1
    path.write_bytes(ids_bytes(ids, fmt, id_name))
    return path


# -- images: id -> source shard -> bytes, only for the rows asked for -----------------------
def id_sources(
    embeddings: str | os.PathLike | None, data_root: str | os.PathLike | None = None
) -> pd.Series:
    """Series id -> input shard path, from the embedding folder's metadata ids (the id column
    ``ecif.data.folder_reader`` picks, as the audit did) and manifest
    (``ecif.data.layout.part_sources``: absolute, relative to the folder, or under
    ``data_root``), whatever the working folder."""
    import pyarrow.parquet as pq

    from ecif.data import layout
    from ecif.data.folder_reader import folder_id_column

    if not embeddings or not Path(embeddings).is_dir():
        return pd.Series(dtype=object)
    folder = Path(embeddings)
    id_col = folder_id_column(folder)
    sources = layout.part_sources(folder, data_root or None)
    parts = []
    for k in layout.list_parts(folder):
        meta_p = layout.part_paths(folder, k)[2]
        names = pq.read_schema(meta_p).names
        if id_col is None or id_col not in names:
            continue
        ids = pq.read_table(meta_p, columns=[id_col]).column(0).to_pandas()
        parts.append(pd.Series(sources.get(k, ""), index=ids.to_numpy()))
    if not parts:
        return pd.Series(dtype=object)
    out = pd.concat(parts)
    return out[~out.index.duplicated()]


@dataclass
class ImageShard:
    """An input shard opened for random access to a few rows' images."""

    path: Path
    kind: str
    rows: pd.Series  # id -> row position
    image_col: str | None
    base_dir: Path
    paths: pd.Series | None = None  # "table": image path per row
    members: list | None = None  # "tar": (offset, size) per row
    row_starts: np.ndarray | None = None  # "parquet": first row of each row group


def open_image_shard(path: str | os.PathLike, id_col: str | None = None) -> ImageShard:
    """Read a shard's ids (not its images); raises InputError/FileNotFoundError if unusable."""
    import pyarrow.parquet as pq

    from ecif.data.readers import open_shard

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: image shard not found (moved or deleted? `ecif app --data-root DIR` or "
            "the sidebar's image data folder points at where the input shards are now)"
        )
    shard = open_shard(path, id_col=id_col)
    rows = pd.Series(np.arange(shard.n_rows), index=shard.meta[shard.id_col].to_numpy())
    rows = rows[~rows.index.duplicated()]  # a repeated id (embed fails the later rows): the first
    out = ImageShard(path, shard.kind, rows, shard.image_col, shard.base_dir)
    if shard.kind == "parquet":
        md = pq.ParquetFile(path).metadata
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        out.row_starts = np.concatenate([[0], np.cumsum(sizes)])
    elif shard.kind == "table":
        out.paths = shard.meta[shard.image_col]
    else:
        out.members = shard.members
    return out


def read_images(shard: ImageShard, ids: Sequence[Any]) -> list[bytes | None]:
    """Image bytes for the given ids (None where missing), reading only what holds them."""
    import pyarrow.parquet as pq

    from ecif.data.readers import image_value, isnull

    pos = [int(shard.rows[i]) if i in shard.rows.index else -1 for i in ids]
    out: list[Any] = [None] * len(pos)
    if shard.kind == "parquet":
        pf = pq.ParquetFile(shard.path)
        groups = {
            int(np.searchsorted(shard.row_starts, p, side="right") - 1) for p in pos if p >= 0
        }
        for g in sorted(groups):
            col = pf.read_row_group(g, columns=[shard.image_col]).column(0)
            lo = shard.row_starts[g]
            for j, p in enumerate(pos):
                if p >= 0 and lo <= p < shard.row_starts[g + 1]:
                    out[j] = image_value(col[p - lo].as_py())
    elif shard.kind == "table":
        for j, p in enumerate(pos):
            if p >= 0 and not isnull(shard.paths.iat[p]):
                out[j] = str(shard.paths.iat[p])
    else:
        with open(shard.path, "rb") as fh:
            for j, p in enumerate(pos):
                m = shard.members[p] if p >= 0 else None
                if m is not None:
                    fh.seek(m[0])
                    out[j] = fh.read(m[1])
    for j, v in enumerate(out):
        if isinstance(v, str):
            f = shard.base_dir / v
            out[j] = f.read_bytes() if f.exists() else None
    return out


def thumbnail(data: bytes | None, size: int = 96) -> bytes | None:
    """A PNG at most ``size`` pixels wide and high; None for missing or undecodable images."""
    if not data:
        return None
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes | None, missing: str | None = MISSING_IMAGE) -> str | None:
    """A data: URI for st.column_config.ImageColumn; ``missing`` (a grey "no image" tile) when
    there is no thumbnail."""
    return missing if png is None else "data:image/png;base64," + base64.b64encode(png).decode()


def format_number(v: float) -> str:
    """Three significant digits that stay short enough for a metric tile: ``-4.56e-05``
    rather than a cut ``-0.0000...``."""
    if v is None or not np.isfinite(v):
        return "-"
    if v != 0 and not 1e-3 <= abs(v) < 1e4:
        mant, exp = f"{v:.2e}".split("e")
        return f"{mant}e{int(exp)}"
    return f"{v:.3g}"
