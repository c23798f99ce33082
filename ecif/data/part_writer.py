"""One output part of ``ecif.embed`` while its rows arrive: temp memmaps, published atomically.

Rows land by position in hidden temp ``.npy`` memmaps next to their final names (the two
embeddings, and with ``--cache-features`` the two feature arrays); ``finish`` renames them and
writes the metadata last (the metadata marks a part done, so a part with metadata has all its
arrays), ``discard`` removes them (an interrupted run leaves nothing half-written).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecif import atomic
from ecif.data import layout
from ecif.data.readers import Shard


class PartWriter:
    """Temp memmaps for one part; rows land by position; ``finish`` publishes atomically."""

    def __init__(
        self,
        folder: Path,
        index: int,
        shard: Shard,
        dims: tuple[int, int],
        feature_dims: tuple[int, int] | None = None,
    ):
        self.folder, self.index, self.shard = folder, index, shard
        n = shard.n_rows
        self.paths = layout.part_paths(folder, index)
        # the arrays: image and text embeddings, then (cache) image and text features
        self.array_paths = list(self.paths[:2])
        all_dims = list(dims)
        if feature_dims is not None:
            self.array_paths += layout.feature_paths(folder, index)
            all_dims += feature_dims
        self.tmps = [atomic.tmp_name(p) for p in self.array_paths]
        self.arrays = []
        for p, tmp, d in zip(self.array_paths, self.tmps, all_dims):
            p.parent.mkdir(parents=True, exist_ok=True)
            self.arrays.append(
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
            )
        self.errors: list[str | None] = [None] * n
        self.seen = np.zeros(n, dtype=bool)
        self.pre = _preflight(shard)

    @property
    def done(self) -> bool:
        return bool(self.seen.all())

    def put(
        self,
        rows: np.ndarray,
        errors: list,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        features: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        """Rows ``rows`` of this part; ``img``/``txt`` (and ``features``, image and text) hold
        the rows whose error is None, in order."""
        self.seen[rows] = True
        for r, e in zip(rows, errors):
            self.errors[r] = e
        if img is not None:
            good = np.array([e is None for e in errors])
            for arr, block in zip(self.arrays, (img, txt, *(features or ()))):
                arr[rows[good]] = block

    def discard(self) -> None:
        """Drop the temp files of an unfinished part (an interrupted run): nothing half-written."""
        self.arrays = []
        for tmp in self.tmps:
            tmp.unlink(missing_ok=True)

    def finish(self, kv: dict[str, str]) -> tuple[int, int]:
        errs = self.final_errors = [p or e for p, e in zip(self.pre, self.errors)]
        for r, e in enumerate(errs):  # a pre-flight failure (bad id) zeroes an embedded row
            if e is not None and self.errors[r] is None:
                for arr in self.arrays:
                    arr[r] = 0
        for arr in self.arrays:
            arr.flush()
        self.arrays = []
        for tmp, p in zip(self.tmps, self.array_paths):  # every array before the metadata
            atomic.publish(tmp, p)
        meta = self.shard.meta.copy()
        meta["status"] = ["ok" if e is None else "failed" for e in errs]
        meta["error_message"] = errs
        failed = sum(e is not None for e in errs)
        ok = self.shard.n_rows - failed
        layout.publish_metadata(self.paths[2], meta, dict(kv, ok=ok, failed=failed))
        return ok, failed


def _preflight(shard: Shard) -> list[str | None]:
    """Row errors known from metadata alone: null or duplicated ids."""
    ids = shard.meta[shard.id_col]
    out: list[str | None] = [None] * len(ids)
    dup = ids.duplicated(keep="first").to_numpy()
    for r, (null, d) in enumerate(zip(ids.isna().to_numpy(), dup)):
        if null:
            out[r] = f"null id in column {shard.id_col!r}"
        elif d:
            out[r] = f"duplicate id {ids.iat[r]!r} (an earlier row has it)"
    return out
