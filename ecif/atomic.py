"""The one way ecif writes files: atomically, and parquet files with ecif's key-value metadata.

A file is written under a hidden temp name next to it, ``.<name>.<pid>.tmp``, and renamed
over the target (``os.replace``) once complete, so a killed run leaves the old file or the
new one, never half of one. A folder (a saved model, the trace context) is filled under the
same kind of temp name and swapped in whole. Nothing else in ecif calls ``os.replace``.

Parquet files carry ecif's metadata in their schema's key-value metadata: key
``ecif.<name>``, value ``<name>``'s JSON encoding (``read_parquet_meta`` returns a dict).
Embedding folders written before this encoding was shared stored their part metadata as
plain strings; a value that is not valid JSON reads back as the string itself.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

KV_PREFIX = "ecif."
TEMP_GLOB = ".*.tmp"  # what tmp_name makes: clean_temps removes what a killed run left


def tmp_name(path: str | os.PathLike) -> Path:
    """A temp name next to ``path``, hidden and unique to this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temp file (from ``tmp_name``) over ``path``, atomically."""
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp``; on success it becomes ``p``, on an
    error it is removed and ``p`` is left as it was. Creates ``p``'s folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(d) as tmp:`` fill the empty folder ``tmp``; on success it replaces
    ``d`` whole (an old ``d`` is removed first), on an error it is removed."""
    path = Path(path)
    tmp = tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    publish(tmp, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=str))


def clean_temps(folder: str | os.PathLike) -> int:
    """Remove the temp files a killed run left in ``folder``; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.glob(TEMP_GLOB):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def encode_meta(meta: dict[str, Any]) -> dict[bytes, bytes]:
    """ecif's key-value metadata as parquet stores it: ``ecif.<name>`` -> JSON."""
    return {
        f"{KV_PREFIX}{k}".encode(): json.dumps(v, default=str).encode() for k, v in meta.items()
    }


def decode_meta(raw: dict[bytes, bytes] | None) -> dict[str, Any]:
    """The ``ecif.`` entries of a parquet schema's key-value metadata, decoded."""
    out = {}
    for k, v in (raw or {}).items():
        key = k.decode()
        if key.startswith(KV_PREFIX):
            text = v.decode()
            try:
                out[key[len(KV_PREFIX) :]] = json.loads(text)
            except ValueError:  # an older embedding part's plain string
                out[key[len(KV_PREFIX) :]] = text
    return out


def write_parquet_atomic(
    path: str | os.PathLike, df: pd.DataFrame, meta: dict[str, Any] | None = None
) -> None:
    """Write ``df`` (without its index) as parquet with ecif's key-value metadata, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if meta:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), **encode_meta(meta)}
        )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_meta(path: str | os.PathLike) -> dict[str, Any]:
    """ecif's key-value metadata of a parquet file (empty for files ecif did not write)."""
    import pyarrow.parquet as pq

    return decode_meta(pq.read_schema(path).metadata)
