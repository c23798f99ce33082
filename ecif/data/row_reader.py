"""Rows of an embedding folder by their position in the training set, read where they are asked.

A Dask worker that holds a block of the head's passes (``ecif.ClusterRows(loader=...)``)
reads that block's rows itself, memory-mapping only the parts they fall in, instead of
receiving them from the driver. Positions follow ``ecif.data.folder_reader.read_folder``:
usable rows (``ok_mask``), parts in numeric order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ecif.data.folder_reader import ok_mask, read_part
from ecif.data.layout import list_parts, part_paths


class FolderRowReader:
    """``reader(rows) -> (image, text)``: the rows at training-set positions ``rows``, in the
    files' dtype. Picklable (a path); the part index is built once per process."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = str(folder)
        self._index: tuple[list[int], np.ndarray, list[np.ndarray]] | None = None

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "_index": None}

    def index(self) -> tuple[list[int], np.ndarray, list[np.ndarray]]:
        """(parts, first training position of each part, usable row numbers in each part)."""
        if self._index is None:
            parts = list_parts(self.folder)
            usable = []
            for n in parts:
                meta = pd.read_parquet(part_paths(Path(self.folder), n)[2])
                usable.append(np.nonzero(ok_mask(meta))[0])
            starts = np.cumsum([0] + [len(u) for u in usable])
            self._index = (parts, starts, usable)
        return self._index

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        parts, starts, usable = self.index()
        if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
            raise IndexError(f"rows out of range for {starts[-1]} usable rows in {self.folder}")
        which = np.searchsorted(starts, rows, side="right") - 1
        x = y = None
        for k in np.unique(which):
            sel = np.nonzero(which == k)[0]
            img, txt, _ = read_part(self.folder, parts[k])
            local = usable[k][rows[sel] - starts[k]]
            order = np.argsort(local)  # memory-mapped reads in file order
            if x is None:
                x = np.empty((len(rows), img.shape[1]), dtype=img.dtype)
                y = np.empty((len(rows), txt.shape[1]), dtype=txt.dtype)
            x[sel[order]] = img[local[order]]
            y[sel[order]] = txt[local[order]]
        if x is None:
            raise ValueError("no rows asked")
        return x, y
