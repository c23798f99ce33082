"""The streaming core of ``ecif.embed``: input rows in, published embedding parts out.

DataLoader workers decode and tokenize chunks of rows; the main process runs the model
(``_encode``) and writes each row straight into its part's temp ``.npy`` memmaps
(``ecif.data.part_writer``), so memory is bounded by the batch. A part is published once all
its rows are in. With ``cache_features`` the trunk runs once per batch and gives both the
features before the output projections and the embeddings from them (``ecif.data.features``). Used by the local path (``ecif.data.embed``) and by each Dask task
(``ecif.data.distributed``).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecif._version import __version__
from ecif.data import features
from ecif.data.models import LoadedModel
from ecif.data.part_writer import PartWriter
from ecif.data.readers import Shard, isnull


def _leave_ctrl_c_to_the_main_process(_worker: int) -> None:
    """Loader workers ignore Ctrl-C: the main process catches it and stops them in order. A
    batch the main process hangs up on mid-transfer (it was interrupted while receiving the
    batch's shared memory) breaks the worker's side of that pipe; that is expected there, not
    a traceback for the user, who already sees how to resume."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    report = sys.excepthook

    def quiet_on_hang_up(kind, value, tb) -> None:
        if not issubclass(kind, (BrokenPipeError, ConnectionResetError)):
            report(kind, value, tb)

    sys.excepthook = quiet_on_hang_up


class _Stream(torch.utils.data.IterableDataset):
    """Items ``(shard, row, image tensor | None, tokens | None, error | None)``; chunk g of
    the pending shards goes to worker ``g % num_workers``."""

    def __init__(self, shards: Sequence[Shard], preprocess: Any, tokenizer: Any, chunk: int):
        self.shards, self.preprocess, self.tokenizer, self.chunk = (
            shards,
            preprocess,
            tokenizer,
            chunk,
        )

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        g = 0
        for s, shard in enumerate(self.shards):
            n = shard.chunks(self.chunk)
            owned = [(g + c) % nw == w for c in range(n)]
            g += n
            for row, img, cap in shard.iter_chunks(self.chunk, owned):
                yield self._item(s, row, img, cap)

    def _item(self, s: int, row: int, img: Any, cap: Any):
        from PIL import Image

        if isnull(cap):
            return s, row, None, None, "empty caption (null)"
        if not isinstance(cap, str):
            return s, row, None, None, f"caption is not text ({type(cap).__name__})"
        if not cap.strip():
            return s, row, None, None, "empty caption"
        if isnull(img):
            return s, row, None, None, "missing image (null)"
        try:
            if isinstance(img, (bytes, bytearray, memoryview)):
                pil = Image.open(io.BytesIO(img))
            else:
                if not os.path.isfile(img):
                    return s, row, None, None, f"missing file: {img}"
                pil = Image.open(img)
            x = self.preprocess(pil.convert("RGB"))
        except Exception as e:
            return s, row, None, None, f"undecodable image: {type(e).__name__}: {e}"[:300]
        return s, row, x, self.tokenizer([cap])[0], None


def _collate(items):
    ok = [it for it in items if it[4] is None]
    return {
        "shard": np.array([it[0] for it in items]),
        "row": np.array([it[1] for it in items]),
        "error": [it[4] for it in items],
        "images": torch.stack([it[2] for it in ok]) if ok else None,
        "tokens": torch.stack([it[3] for it in ok]) if ok else None,
    }


def _encode(
    lm: LoadedModel, batch: dict, cache_features: str | None = None, cache_blocks: int = 1
) -> tuple[np.ndarray, ...]:
    """(image, text) unit-norm embeddings of the batch's good rows; with ``cache_features``
    also (image, text) features before the projections, float16, from the same trunk pass."""
    dev = lm.device
    images = batch["images"].to(dev, non_blocking=True)
    tokens = batch["tokens"].to(dev, non_blocking=True)
    feats: tuple[torch.Tensor, ...] = ()
    with torch.inference_mode():
        if dev.startswith("cuda"):
            ctx = torch.autocast("cuda", dtype=torch.float16)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            if cache_features:
                fu, fv, u, v = features.encode(
                    lm.model, images, tokens, cache_features, cache_blocks
                )
                feats = (fu, fv)
            else:
                u = lm.model.encode_image(images)
                v = lm.model.encode_text(tokens)
        u = torch.nn.functional.normalize(u.float(), dim=-1)
        v = torch.nn.functional.normalize(v.float(), dim=-1)
        out = [u.cpu().numpy(), v.cpu().numpy()]
        out += [f.to(torch.float16).cpu().numpy() for f in feats]
    return tuple(out)


def _error_kinds(errors: Sequence[str | None]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for e in errors:
        if e is not None:
            kind = e.split(":")[0].split(" (")[0]
            kind = next((k for k in ("null id", "duplicate id") if kind.startswith(k)), kind)
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def run_parts(
    pending: Sequence[tuple[int, Shard]],
    lm: LoadedModel,
    out: Path,
    *,
    batch_size: int,
    num_workers: int = 0,
    chunk_rows: int | None = None,
    progress: bool = False,
    on_done: Callable[[int, int, int, dict[str, int]], None] | None = None,
    cache_features: str | None = None,
    cache_blocks: int = 1,
) -> None:
    """Embed ``(part index, shard)`` pairs into ``out``; ``on_done(k, ok, failed, error_kinds)``
    after each part is published. The streaming core shared by the local and Dask paths.
    ``cache_features="projection"``: each part also gets its features before the output
    projections (``ecif.data.features``), published before its metadata; ``"lora"``: the
    token states entering block L-``cache_blocks`` (``ecif.data.lora_features``)."""
    features.check_kind(cache_features)
    dims = (lm.dim_image, lm.dim_text)
    fdims = (
        features.feature_dims(lm.model, cache_features, cache_blocks) if cache_features else None
    )
    base_kv = {"model": lm.name, "pretrained": lm.pretrained or "", "ecif_version": __version__}
    if cache_features:  # (absent without a cache: those parts stay as they were)
        base_kv["features"] = cache_features
        if cache_features == "lora":
            base_kv["feature_blocks"] = str(cache_blocks)

    writers: dict[int, PartWriter] = {}

    def finish(s: int) -> None:
        k, sh = pending[s]
        w = writers.pop(s)
        ok, failed = w.finish(dict(base_kv, source=sh.path.name, id_column=sh.id_col))
        if on_done:
            on_done(k, ok, failed, _error_kinds(w.final_errors))

    for s, (_, sh) in enumerate(pending):  # empty shards; others open lazily, so open
        if sh.n_rows == 0:  # temp files stay bounded by the shards in flight
            writers[s] = PartWriter(out, pending[s][0], sh, dims, fdims)
            finish(s)
    finished = {s for s, (_, sh) in enumerate(pending) if sh.n_rows == 0}
    total = sum(sh.n_rows for _, sh in pending)
    if total:
        chunk = chunk_rows or max(batch_size, 256)
        stream = _Stream([sh for _, sh in pending], lm.preprocess, lm.tokenizer, chunk)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=lm.device.startswith("cuda"),
            persistent_workers=False,
            worker_init_fn=_leave_ctrl_c_to_the_main_process if num_workers else None,
        )
        from tqdm import tqdm

        bar = tqdm(total=total, disable=not progress, unit="img", desc="embedding")
        try:
            for batch in loader:
                img = txt = None
                feats: tuple[np.ndarray, ...] = ()
                if batch["images"] is not None:
                    img, txt, *feats = _encode(lm, batch, cache_features, cache_blocks)
                good = np.array([e is None for e in batch["error"]])
                cum = np.cumsum(good) - 1
                for s in np.unique(batch["shard"]):
                    m = batch["shard"] == s
                    sel = cum[m & good]
                    errs = [e for e, keep in zip(batch["error"], m) if keep]
                    if s not in writers:
                        writers[s] = PartWriter(out, pending[s][0], pending[s][1], dims, fdims)
                    writers[s].put(
                        batch["row"][m],
                        errs,
                        None if img is None else img[sel],
                        None if txt is None else txt[sel],
                        tuple(f[sel] for f in feats) if feats else None,
                    )
                    if writers[s].done:
                        finish(s)
                        finished.add(s)
                bar.update(len(batch["row"]))
        except BaseException:  # Ctrl-C or an error: unfinished parts leave no temp files
            for w in writers.values():
                w.discard()
            raise
        finally:
            bar.close()
    if writers or len(finished) != len(pending):
        missing = sorted(set(range(len(pending))) - finished)
        raise RuntimeError(f"internal error: parts {missing} did not receive all their rows")
