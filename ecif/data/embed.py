"""``ecif.embed``: image-text shards in, a clip-retrieval embedding folder out.

Streaming: DataLoader workers decode and tokenize chunks of rows; the main process runs the
model and writes each row straight into its part's temp ``.npy`` memmaps, so memory is bounded
by the batch. Input shard k becomes part k; a part is published atomically (temp + rename,
metadata last) once all its rows are in, so a rerun skips finished parts and redoes the rest:
after a kill, every row ends up exactly once.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecif._version import __version__
from ecif.data import layout
from ecif.data.models import LoadedModel, load_model
from ecif.data.part_writer import PartWriter
from ecif.data.readers import Shard, discover, isnull, open_shard

log = logging.getLogger(__name__)
_SLEEP_ENV = "ECIF_EMBED_TEST_SLEEP"  # test hook: seconds to sleep per batch (kill tests)


@dataclass
class EmbedResult:
    """Counts of one ``embed`` run; ``skipped`` rows were in parts a previous run finished."""

    folder: Path
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    parts_written: int = 0
    parts_skipped: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0  # of which creating/loading the model
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        busy = self.seconds - self.model_seconds
        rate = (self.ok + self.failed) / busy if busy > 0 else 0.0
        return (
            f"embedded: ok={self.ok} failed={self.failed} skipped={self.skipped} "
            f"(parts written {self.parts_written}, skipped {self.parts_skipped}; "
            f"{rate:.1f} rows/s after model load) -> {self.folder}"
        )


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


def _encode(lm: LoadedModel, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    dev = lm.device
    images = batch["images"].to(dev, non_blocking=True)
    tokens = batch["tokens"].to(dev, non_blocking=True)
    with torch.inference_mode():
        if dev.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.float16):
                u = lm.model.encode_image(images)
                v = lm.model.encode_text(tokens)
        else:
            u = lm.model.encode_image(images)
            v = lm.model.encode_text(tokens)
        u = torch.nn.functional.normalize(u.float(), dim=-1)
        v = torch.nn.functional.normalize(v.float(), dim=-1)
    return u.cpu().numpy(), v.cpu().numpy()


def _manifest(
    shards: Sequence[Shard], lm: LoadedModel, done_parts: dict[int, dict], out: Path
) -> dict:
    """Input shards by absolute path, by path relative to the embedding folder (a folder moved
    together with its data) and under ``input_root`` (``--data-root`` re-points that)."""
    paths = [sh.path.resolve() for sh in shards]
    parts = [
        {
            "index": k,
            "source": str(p),
            "source_relative": os.path.relpath(p, out.resolve()),
            "rows": sh.n_rows,
            **done_parts.get(k, {}),
        }
        for k, (sh, p) in enumerate(zip(shards, paths))
    ]
    return {
        "ecif_version": __version__,
        "model": lm.name,
        "pretrained": lm.pretrained,
        "dims": {"image": lm.dim_image, "text": lm.dim_text},
        "logit_scale": lm.logit_scale,
        "dtype": "float16",
        "normalized": True,
        "id_column": shards[0].id_col if shards else None,
        "rows": {
            "total": sum(sh.n_rows for sh in shards),
            "ok": sum(p.get("ok", 0) for p in done_parts.values()),
            "failed": sum(p.get("failed", 0) for p in done_parts.values()),
        },
        "complete": len(done_parts) == len(shards),
        "input_shards": [str(p) for p in paths],
        "input_root": os.path.commonpath([str(p.parent) for p in paths]) if paths else None,
        "parts": parts,
    }


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
) -> None:
    """Embed ``(part index, shard)`` pairs into ``out``; ``on_done(k, ok, failed, error_kinds)``
    after each part is published. The streaming core shared by the local and Dask paths."""
    dims = (lm.dim_image, lm.dim_text)
    base_kv = {"model": lm.name, "pretrained": lm.pretrained or "", "ecif_version": __version__}

    writers: dict[int, PartWriter] = {}

    def finish(s: int) -> None:
        k, sh = pending[s]
        w = writers.pop(s)
        ok, failed = w.finish(dict(base_kv, source=sh.path.name, id_column=sh.id_col))
        if on_done:
            on_done(k, ok, failed, _error_kinds(w.final_errors))

    for s, (_, sh) in enumerate(pending):  # empty shards; others open lazily, so open
        if sh.n_rows == 0:  # temp files stay bounded by the shards in flight
            writers[s] = PartWriter(out, pending[s][0], sh, dims)
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
        )
        sleep = float(os.environ.get(_SLEEP_ENV, "0") or 0)
        from tqdm import tqdm

        bar = tqdm(total=total, disable=not progress, unit="img", desc="embedding")
        try:
            for batch in loader:
                img = txt = None
                if batch["images"] is not None:
                    img, txt = _encode(lm, batch)
                good = np.array([e is None for e in batch["error"]])
                cum = np.cumsum(good) - 1
                for s in np.unique(batch["shard"]):
                    m = batch["shard"] == s
                    sel = cum[m & good]
                    errs = [e for e, keep in zip(batch["error"], m) if keep]
                    if s not in writers:
                        writers[s] = PartWriter(out, pending[s][0], pending[s][1], dims)
                    writers[s].put(
                        batch["row"][m],
                        errs,
                        None if img is None else img[sel],
                        None if txt is None else txt[sel],
                    )
                    if writers[s].done:
                        finish(s)
                        finished.add(s)
                bar.update(len(batch["row"]))
                if sleep:
                    time.sleep(sleep)
        except BaseException:  # Ctrl-C or an error: unfinished parts leave no temp files
            for w in writers.values():
                w.discard()
            raise
        finally:
            bar.close()
    if writers or len(finished) != len(pending):
        missing = sorted(set(range(len(pending))) - finished)
        raise RuntimeError(f"internal error: parts {missing} did not receive all their rows")


def embed(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    model: str = "ViT-B-32",
    pretrained: str | None = "auto",
    *,
    id_col: str | None = None,
    caption_col: str | None = None,
    image_col: str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    chunk_rows: int | None = None,
    progress: bool = False,
    random_init: bool = False,
    distributor: str = "local",
    scheduler: str | None = None,
) -> EmbedResult:
    """Embed image-text shards into a clip-retrieval folder at ``output``; returns counts.

    ``inputs``: parquet/tar/csv shard files, folders of them, or globs. ``model`` and
    ``pretrained`` as in ``open_clip.create_model_and_transforms``, or ``local-dir:PATH``
    (``pretrained`` ignored), or ``ecif-tiny`` (the cached tiny model). ``pretrained="auto"``
    takes the model's first listed tag, which needs a download once (or open_clip's cache).
    Rows that cannot be embedded are kept (``status="failed"``, ``error_message``, zero
    embeddings). Finished parts of an earlier run into the same folder are skipped.
    ``distributor="dask"``: one task per shard on the Dask ``scheduler`` (``tcp://...``; none:
    an in-process cluster); each worker loads the model once and writes its parts itself.
    """
    t0 = time.perf_counter()
    if distributor not in ("local", "dask"):
        raise ValueError(f"distributor must be 'local' or 'dask', not {distributor!r}")
    out = Path(output)
    paths = discover(inputs)
    shards = [
        open_shard(p, id_col=id_col, caption_col=caption_col, image_col=image_col) for p in paths
    ]
    t_model = time.perf_counter()
    lm = load_model(model, pretrained, device, random_init=random_init)
    t_model = time.perf_counter() - t_model
    out.mkdir(parents=True, exist_ok=True)
    layout.clean_stale_temps(out)
    old = layout.read_manifest(out)
    if old and (old.get("model"), old.get("pretrained")) != (lm.name, lm.pretrained):
        raise layout.FolderError(
            f"{out}: was written with model {layout.model_label(old.get('model'), old.get('pretrained'))}"
            f", not {layout.model_label(lm.name, lm.pretrained)}; use another output folder"
        )
    res = EmbedResult(out, model_seconds=t_model)
    pending: list[tuple[int, Shard]] = []
    done_parts: dict[int, dict] = {}
    for k, sh in enumerate(shards):
        meta_p = layout.part_paths(out, k)[2]
        if meta_p.exists():
            kv = layout.part_kv(meta_p)
            if kv.get("source") != sh.path.name:
                raise layout.FolderError(
                    f"{meta_p}: part {k} was made from {kv.get('source')!r}, not "
                    f"{sh.path.name!r}; the input shards changed, use another output folder"
                )
            res.skipped += sh.n_rows
            res.parts_skipped += 1
            done_parts[k] = {"ok": int(kv.get("ok", 0)), "failed": int(kv.get("failed", 0))}
        else:
            pending.append((k, sh))

    def record(k: int, ok: int, failed: int, kinds: dict[str, int]) -> None:
        res.ok += ok
        res.failed += failed
        res.parts_written += 1
        for kind, c in kinds.items():
            res.errors[kind] = res.errors.get(kind, 0) + c
        done_parts[k] = {"ok": ok, "failed": failed}
        layout.write_manifest(out, _manifest(shards, lm, done_parts, out))

    run = dict(batch_size=batch_size, chunk_rows=chunk_rows, progress=progress, on_done=record)
    if distributor == "dask":
        from ecif.data.distributed import run_dask

        cols = dict(id_col=id_col, caption_col=caption_col, image_col=image_col)
        load = dict(model=lm.name, pretrained=lm.pretrained, device=device, random_init=random_init)
        run_dask(pending, out, load, cols, scheduler=scheduler, **run)
    else:
        run_parts(pending, lm, out, num_workers=num_workers, **run)
    layout.write_manifest(out, _manifest(shards, lm, done_parts, out))
    res.seconds = time.perf_counter() - t0
    log.info(res.summary())
    return res
