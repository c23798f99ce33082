"""Input shards: img2dataset parquet, img2dataset webdataset tars, tables of ``path, caption``.

A ``Shard`` knows its row count and metadata up front (without image bytes) and streams
``(row, image, caption)`` for the chunks a DataLoader worker owns, so memory stays bounded by
the chunk, not the shard. ``image`` is bytes, a path, or None (missing).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

BYTES_COLS = ("jpg", "png", "webp", "jpeg", "image", "image_bytes", "img")
PATH_COLS = ("path", "image_path", "filepath", "file_path", "file_name", "filename", "file")
ID_COLS = ("key", "uid", "id")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
RESERVED = ("status", "error_message")  # input columns of these names are kept as input_*


class InputError(ValueError):
    """An input that cannot be read at all; the message names the file and the column."""


@dataclass
class Shard:
    """One input file, one output part."""

    path: Path
    kind: str  # "parquet" (image bytes streamed), "table" (paths), "tar"
    meta: pd.DataFrame  # one row per pair, no image bytes; includes id and caption columns
    id_col: str
    caption_col: str
    image_col: str | None = None
    base_dir: Path = field(default_factory=Path)
    members: list[tuple[int, int] | None] | None = None  # tar: (offset, size) of each image
    captions: list[Any] | None = None  # tar: caption per row

    @property
    def n_rows(self) -> int:
        return len(self.meta)

    def chunks(self, chunk_rows: int) -> int:
        return -(-self.n_rows // chunk_rows)

    def iter_chunks(self, chunk_rows: int, owned: Sequence[bool]) -> Iterator[tuple[int, Any, Any]]:
        """Yield (row, image, caption) for chunks ``c`` with ``owned[c]`` true."""
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            # only row groups holding owned rows are read; record batches need not line up
            # with chunks (row groups cut them), so ownership is decided per row
            pf = pq.ParquetFile(self.path)
            caps = self.meta[self.caption_col]
            start = 0
            for g in range(pf.metadata.num_row_groups):
                g_rows = pf.metadata.row_group(g).num_rows
                lo, hi = start // chunk_rows, (start + g_rows - 1) // chunk_rows
                if g_rows and any(owned[lo : hi + 1]):
                    row = start
                    cols = [self.image_col]
                    for batch in pf.iter_batches(chunk_rows, row_groups=[g], columns=cols):
                        n = batch.num_rows
                        if any(owned[row // chunk_rows : (row + n - 1) // chunk_rows + 1]):
                            for i, v in enumerate(batch.column(0).to_pylist()):
                                if owned[(row + i) // chunk_rows]:
                                    v = image_value(v)
                                    if isinstance(v, str):  # {bytes: None, path: ...}
                                        v = self.base_dir / v
                                    yield row + i, v, caps.iat[row + i]
                        row += n
                start += g_rows
        elif self.kind == "table":
            paths = self.meta[self.image_col]
            caps = self.meta[self.caption_col]
            for c in range(self.chunks(chunk_rows)):
                if owned[c]:
                    for r in range(c * chunk_rows, min(self.n_rows, (c + 1) * chunk_rows)):
                        p = paths.iat[r]
                        img = None if isnull(p) else self.base_dir / str(p)
                        yield r, img, caps.iat[r]
        else:  # tar: seek to each member's data; img2dataset tars are uncompressed
            with open(self.path, "rb") as f:
                for c in range(self.chunks(chunk_rows)):
                    if not owned[c]:
                        continue
                    for r in range(c * chunk_rows, min(self.n_rows, (c + 1) * chunk_rows)):
                        m = self.members[r]
                        data = None
                        if m is not None:
                            f.seek(m[0])
                            data = f.read(m[1])
                        yield r, data, self.captions[r]


def isnull(v: Any) -> bool:
    """None, NaN, pd.NA or NaT (scalars only; bytes, strings and containers are not null)."""
    if v is None:
        return True
    if isinstance(v, (str, bytes, bytearray, memoryview, dict, list, tuple, np.ndarray)):
        return False
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def image_value(v: Any) -> Any:
    """bytes, a path string, or a {bytes, path} struct (Hugging Face style) -> bytes/str/None."""
    if isinstance(v, dict):
        return v.get("bytes") or v.get("path")
    return v


def discover(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Input files, sorted: a file, a folder of shards, a glob, or a list of those."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            # tars first: img2dataset writes a metadata-only .parquet next to each .tar
            found = []
            for exts in (("tar",), ("parquet",), ("csv", "tsv")):
                found = [q for ext in exts for q in p.glob(f"*.{ext}")]
                if found:
                    break
            if not found:
                raise InputError(f"{p}: no .parquet, .tar or .csv shards in this folder")
            out.extend(sorted(found))
        elif p.exists():
            out.append(p)
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(p.anchor or ".").glob(str(p.relative_to(p.anchor or "."))))
            if not found:
                raise InputError(f"{item}: the pattern matches no files")
            out.extend(found)
        else:
            raise InputError(f"{p}: no such file or folder")
    return out


def open_shard(
    path: Path,
    *,
    id_col: str | None = None,
    caption_col: str | None = None,
    image_col: str | None = None,
) -> Shard:
    """Read a shard's metadata and decide its columns; a missing column is an InputError."""
    name = path.name
    if name.endswith(".tar"):
        shard = _open_tar(path, id_col, caption_col)
    elif name.endswith((".tar.gz", ".tgz")):
        raise InputError(f"{path}: compressed tars are not supported; decompress it first")
    elif name.endswith(".parquet"):
        shard = _open_parquet(path, id_col, caption_col, image_col)
    elif name.endswith((".csv", ".tsv")):
        shard = _open_csv(path, id_col, caption_col, image_col)
    else:
        raise InputError(f"{path}: unknown input format (want .parquet, .tar, .csv or .tsv)")
    shard.meta = _rename_reserved(shard.meta)
    shard.meta[shard.id_col] = _check_ids(shard.meta[shard.id_col], path, shard.id_col)
    return shard


def _missing(path: Path, what: str, col: str | None, cols: Sequence[str], tried=()) -> InputError:
    if col:
        return InputError(f"{path}: {what} column {col!r} not found; columns are {list(cols)}")
    return InputError(
        f"{path}: no {what} column (tried {list(tried)}); columns are {list(cols)}. "
        f"Name it with --{what}-col"
    )


def _pick(cols: Sequence[str], given: str | None, tried: Sequence[str]) -> str | None:
    if given:
        return given if given in cols else None
    return next((c for c in tried if c in cols), None)


def _open_parquet(path: Path, id_col, caption_col, image_col) -> Shard:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable parquet file ({e})") from e
    cols = schema.names
    cap = _pick(cols, caption_col, ("caption", "txt", "text"))
    if cap is None:
        raise _missing(path, "caption", caption_col, cols, ("caption", "txt", "text"))
    img = _pick(cols, image_col, BYTES_COLS + PATH_COLS)
    if img is None:
        raise _missing(path, "image", image_col, cols, BYTES_COLS + PATH_COLS)
    if img == cap:
        raise InputError(f"{path}: {cap!r} is taken as both the caption and the image column")
    typ = schema.field(img).type
    is_bytes = pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_struct(typ)
    meta_cols = [c for c in cols if c != img] if is_bytes else cols
    meta = pq.read_table(path, columns=meta_cols).to_pandas()
    idc = _pick(cols, id_col, ID_COLS)
    if id_col and idc is None:
        raise _missing(path, "id", id_col, cols)
    kind = "parquet" if is_bytes else "table"
    if idc is None:
        idc = "key"
        meta.insert(0, idc, _default_ids(path, meta, None if is_bytes else img))
    return Shard(path, kind, meta, idc, cap, img, base_dir=path.parent)


def _open_csv(path: Path, id_col, caption_col, image_col) -> Shard:
    sep = "\t" if path.suffix == ".tsv" else ","
    try:
        cols = list(pd.read_csv(path, sep=sep, nrows=0).columns)
    except Exception as e:
        raise InputError(f"{path}: not a readable CSV file ({e})") from e
    cap = _pick(cols, caption_col, ("caption", "txt", "text"))
    if cap is None:
        raise _missing(path, "caption", caption_col, cols, ("caption", "txt", "text"))
    img = _pick(cols, image_col, PATH_COLS)
    if img is None:
        raise _missing(path, "image", image_col, cols, PATH_COLS)
    if img == cap:
        raise InputError(f"{path}: {cap!r} is taken as both the caption and the image column")
    idc = _pick(cols, id_col, ID_COLS)
    if id_col and idc is None:
        raise _missing(path, "id", id_col, cols)
    dtypes = {img: str, cap: str, **({idc: str} if idc else {})}
    meta = pd.read_csv(path, sep=sep, dtype=dtypes, keep_default_na=False, na_values=[""])
    if idc is None:
        idc = "key"
        meta.insert(0, idc, _default_ids(path, meta, img))
    return Shard(path, "table", meta, idc, cap, img, base_dir=path.parent)


def _default_ids(path: Path, meta: pd.DataFrame, path_col: str | None) -> list[str]:
    """No id column: the image path when there is one, else ``<shard stem>-<row>``."""
    if path_col is not None:
        return [None if isnull(p) else str(p) for p in meta[path_col]]
    stem = path.name.split(".")[0]
    return [f"{stem}-{i:07d}" for i in range(len(meta))]


def _open_tar(path: Path, id_col, caption_col) -> Shard:
    try:
        tf = tarfile.open(path, mode="r:")
        infos = tf.getmembers()
    except tarfile.TarError as e:
        raise InputError(f"{path}: not a readable (uncompressed) tar file ({e})") from e
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for ti in infos:
        if not ti.isfile():
            continue
        base = os.path.basename(ti.name)
        if base.startswith("."):
            continue
        key, _, ext = base.partition(".")
        prefix = os.path.dirname(ti.name)
        samples.setdefault(os.path.join(prefix, key), {})[ext.lower()] = ti
    rows, members, captions = [], [], []
    with tf:
        for key, parts in samples.items():
            info: dict[str, Any] = {}
            if "json" in parts:
                try:
                    info = json.loads(tf.extractfile(parts["json"]).read())
                    info = {k: v for k, v in info.items() if not isinstance(v, (dict, list))}
                except (json.JSONDecodeError, UnicodeDecodeError):
                    info = {"json_error": "unreadable .json member"}
            info.setdefault("key", os.path.basename(key))
            cap = None
            if "txt" in parts:
                cap = tf.extractfile(parts["txt"]).read().decode("utf-8", errors="replace")
            elif caption_col and caption_col in info:
                cap = info[caption_col]
            elif "caption" in info:
                cap = info["caption"]
            img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            members.append(None if img is None else (img.offset_data, img.size))
            captions.append(cap)
            info["caption"] = cap
            info["tar_member"] = key
            rows.append(info)
    meta = pd.DataFrame(rows)
    if len(meta) == 0:
        meta = pd.DataFrame({"key": pd.Series(dtype=str), "caption": pd.Series(dtype=str)})
    idc = id_col or "key"
    if idc not in meta.columns:
        raise _missing(path, "id", id_col, list(meta.columns))
    return Shard(path, "tar", meta, idc, "caption", None, path.parent, members, captions)


def _rename_reserved(meta: pd.DataFrame) -> pd.DataFrame:
    """Keep the input's own ``status``/``error_message`` as ``input_status`` etc."""
    ren = {c: f"input_{c}" for c in RESERVED if c in meta.columns}
    return meta.rename(columns=ren) if ren else meta


def _check_ids(ids: pd.Series, path: Path, col: str) -> pd.Series:
    """Ids must be integers or strings. Whole-valued floats (ints promoted by a null) become
    nullable ints; other types are an InputError naming the file and column."""
    if pd.api.types.is_bool_dtype(ids):
        raise InputError(f"{path}: id column {col!r} is boolean; ids must be integers or strings")
    if (
        pd.api.types.is_integer_dtype(ids)
        or pd.api.types.is_string_dtype(ids)
        and all(isinstance(v, str) or isnull(v) for v in ids)
    ):
        return ids
    if pd.api.types.is_float_dtype(ids):
        vals = ids.dropna()
        if (vals == np.round(vals)).all():
            return ids.astype("Int64")
        raise InputError(
            f"{path}: id column {col!r} holds non-integer numbers (e.g. {vals[vals != np.round(vals)].iloc[0]}); "
            "ids must be integers or strings"
        )
    kinds = {type(v).__name__ for v in ids if not isnull(v)}
    if kinds <= {"str", "int"}:
        log.warning("%s: id column %r mixes str and int; using strings", path, col)
        return ids.map(lambda v: None if isnull(v) else str(v))
    raise InputError(
        f"{path}: id column {col!r} has values of type {sorted(kinds)}; ids must be integers "
        "or strings"
    )
