"""The images behind an embedding folder, read back from the input shards its manifest names.

Retraining a model on the pairs a filter keeps needs the pixels, not the embeddings. An
embedding folder written by ``ecif embed`` records its input shards (``manifest.json``:
``parts[k].source``) and keeps one metadata row per input row, so part k's ok rows are the
source shard's rows at the same positions. Images are decoded, resized (shorter side, bicubic)
and centre-cropped to a square, as open_clip's preprocess does, and kept as uint8.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ecif.data import layout
from ecif.data.folder_reader import ok_mask
from ecif.data.readers import InputError, open_shard


def square_uint8(image, size: int) -> np.ndarray:
    """bytes, a path or a PIL image -> uint8 (size, size, 3): shorter side to ``size``
    (bicubic), centre crop, RGB."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(image))
    elif not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_pair_images(
    folder: str | os.PathLike, size: int, chunk_rows: int = 256
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ids, images uint8 (N, size, size, 3), captions) of the ok rows of an embedding folder,
    in the folder's row order (the order ``EmbeddingSet.load`` and the audit table use).

    Raises ``InputError`` naming the shard when a source shard is gone or no longer matches
    (a different row count or different ids).
    """
    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    if not manifest or not manifest.get("parts"):
        raise InputError(
            f"{folder}: no manifest.json naming the input shards (written by `ecif embed`); "
            "the images cannot be found"
        )
    id_col = manifest.get("id_column")
    ids: list = []
    images: list[np.ndarray] = []
    captions: list[str] = []
    for part in sorted(manifest["parts"], key=lambda p: p["index"]):
        if not part.get("source"):
            raise InputError(
                f"{folder}: manifest.json records no input shard for part {part['index']} "
                "(folders from EmbeddingSet.save keep no images); embed the shards with `ecif embed`"
            )
        k, source = part["index"], Path(part["source"])
        meta = pd.read_parquet(layout.part_paths(folder, k)[2])
        if not source.exists():
            raise InputError(f"{source}: input shard of part {k} of {folder} is missing")
        shard = open_shard(source, id_col=id_col)
        if shard.n_rows != len(meta):
            raise InputError(
                f"{source}: has {shard.n_rows} rows, but part {k} of {folder} has {len(meta)}; "
                "the input shard changed since it was embedded"
            )
        ok = ok_mask(meta)
        got: dict[int, tuple[np.ndarray, str]] = {}
        n_chunks = shard.chunks(chunk_rows)
        for row, image, caption in shard.iter_chunks(chunk_rows, [True] * n_chunks):
            if ok[row]:
                got[row] = (square_uint8(image, size), str(caption))
        want = shard.meta[shard.id_col].to_numpy()
        have = meta[id_col].to_numpy() if id_col in meta else want
        for row in np.nonzero(ok)[0]:
            if want[row] != have[row]:
                raise InputError(
                    f"{source}: row {row} has id {want[row]!r}, but part {k} of {folder} has "
                    f"{have[row]!r}; the input shard changed since it was embedded"
                )
            ids.append(have[row])
            images.append(got[row][0])
            captions.append(got[row][1])
    empty = np.zeros((0, size, size, 3), np.uint8)
    return np.asarray(ids), (np.stack(images) if images else empty), captions
