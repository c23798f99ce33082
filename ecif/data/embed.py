"""``ecif.embed``: image-text shards in, a clip-retrieval embedding folder out.

Streaming (``ecif.data.embed_stream``): DataLoader workers decode and tokenize chunks of rows;
the main process runs the model and writes each row straight into its part's temp ``.npy``
memmaps, so memory is bounded by the batch. Input shard k becomes part k; a part is published atomically (temp + rename,
metadata last) once all its rows are in, so a rerun skips finished parts and redoes the rest:
after a kill, every row ends up exactly once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ecif._version import __version__
from ecif.data import features, layout
from ecif.data.distributed import run_dask
from ecif.data.embed_stream import run_parts
from ecif.data.models import LoadedModel, load_model
from ecif.data.readers import Shard, discover, open_shard

log = logging.getLogger(__name__)


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


def _manifest(
    shards: Sequence[Shard],
    lm: LoadedModel,
    done_parts: dict[int, dict],
    out: Path,
    cache: dict | None = None,
) -> dict:
    """Input shards by absolute path, by path relative to the embedding folder (a folder moved
    together with its data) and under ``input_root`` (``--data-root`` re-points that);
    ``cache``: the ``features`` entry of a run with ``cache_features`` (absent otherwise)."""
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
        **({"features": cache} if cache else {}),
    }


def _check_cache(meta_p: Path, k: int, had: str | None, wants: str | None) -> None:
    """A finished part must have been written with the same ``cache_features`` (and, for
    ``lora``, ``cache_blocks``: ``had``/``wants`` then read ``lora:k``) as this run."""
    if had == wants:
        return
    flag = "--cache-features"
    was = f"with {flag} {had}" if had else f"without {flag}"
    now = f"asks for {flag} {wants}" if wants else f"has no {flag}"
    raise layout.FolderError(
        f"{meta_p}: part {k} was written {was} and this run {now}; use another output folder "
        "(or rerun as the folder was written)"
    )


def _cache_label(kv: dict) -> str | None:
    """A part's cache as ``_check_cache`` compares it: None, ``projection`` or ``lora:k``."""
    kind = kv.get("features") or None
    return f"{kind}:{kv.get('feature_blocks', '1')}" if kind == "lora" else kind


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
    cache_features: str | None = None,
    cache_blocks: int = 1,
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
    ``cache_features="projection"``: the trunk runs once and each part also stores, per pair,
    the pooled features before the model's output projections (``features/``, float16), the
    embeddings being those features through the projections; ``features/trainable_init.pt``
    holds the projections and logit scale (``ecif.data.features``, read by
    ``load_features``). ``cache_features="lora"``: the token states entering block
    L-``cache_blocks`` of each tower, and in ``trainable_init.pt`` the last ``cache_blocks``
    blocks that finish the towers (``ecif.data.lora_features``). Parts of an earlier run must
    have been written the same way.
    """
    t0 = time.perf_counter()
    if distributor not in ("local", "dask"):
        raise ValueError(f"distributor must be 'local' or 'dask', not {distributor!r}")
    features.check_kind(cache_features)
    out = Path(output)
    paths = discover(inputs)
    shards = [
        open_shard(p, id_col=id_col, caption_col=caption_col, image_col=image_col) for p in paths
    ]
    t_model = time.perf_counter()
    lm = load_model(model, pretrained, device, random_init=random_init)
    t_model = time.perf_counter() - t_model
    if cache_features:
        features.check_model(lm, cache_features, cache_blocks)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    layout.clean_stale_temps(out)
    old = layout.read_manifest(out)
    if old and (old.get("model"), old.get("pretrained")) != (lm.name, lm.pretrained):
        raise layout.FolderError(
            f"{out}: was written with model {layout.model_label(old.get('model'), old.get('pretrained'))}"
            f", not {layout.model_label(lm.name, lm.pretrained)}; use another output folder"
        )
    res = EmbedResult(out, model_seconds=t_model)
    wants_kv = {"features": cache_features or "", "feature_blocks": str(cache_blocks)}
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
            _check_cache(meta_p, k, _cache_label(kv), _cache_label(wants_kv))
            res.skipped += sh.n_rows
            res.parts_skipped += 1
            done_parts[k] = {"ok": int(kv.get("ok", 0)), "failed": int(kv.get("failed", 0))}
        else:
            pending.append((k, sh))

    cache = None
    if cache_features:  # the init first: every part with features finds it
        features.write_trainable_init(out, lm, cache_features, cache_blocks)
        cache = features.manifest_entry(lm, cache_features, cache_blocks)

    def record(k: int, ok: int, failed: int, kinds: dict[str, int]) -> None:
        res.ok += ok
        res.failed += failed
        res.parts_written += 1
        for kind, c in kinds.items():
            res.errors[kind] = res.errors.get(kind, 0) + c
        done_parts[k] = {"ok": ok, "failed": failed}
        layout.write_manifest(out, _manifest(shards, lm, done_parts, out, cache))

    run = dict(
        batch_size=batch_size,
        chunk_rows=chunk_rows,
        progress=progress,
        on_done=record,
        cache_features=cache_features,
        cache_blocks=cache_blocks,
    )
    if distributor == "dask":
        cols = dict(id_col=id_col, caption_col=caption_col, image_col=image_col)
        load = dict(model=lm.name, pretrained=lm.pretrained, device=device, random_init=random_init)
        run_dask(pending, out, load, cols, scheduler=scheduler, **run)
    else:
        run_parts(pending, lm, out, num_workers=num_workers, **run)
    layout.write_manifest(out, _manifest(shards, lm, done_parts, out, cache))
    res.seconds = time.perf_counter() - t0
    log.info(res.summary())
    return res
