"""``ecif embed``: image-text shards -> clip-retrieval embedding folder (mirrors ``ecif.embed``)."""

from __future__ import annotations

import argparse
import sys

from ecif.cli import common

NAME = "embed"
HELP = "embed image-text shards with an open_clip model into a clip-retrieval folder"
DESCRIPTION = (
    "Read img2dataset parquet shards (image bytes or a path column), img2dataset webdataset "
    ".tar shards, or CSV/parquet tables of `path, caption`, and write img_emb/, text_emb/, "
    "metadata/ and manifest.json. One output part per input shard, written atomically; "
    "rerunning into the same folder skips finished parts. Rows that cannot be embedded are "
    "kept with status=failed and an error_message (zero embeddings); a run in which every row "
    "failed exits 2. Ctrl-C stops it; rerunning the same command resumes."
)
INTERRUPTED = "interrupted; rerun the same command to resume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="shard files, folders of shards, or globs")
    p.add_argument("--output", "-o", required=True, help="output embedding folder")
    p.add_argument(
        "--model",
        default="ViT-B-32",
        help="open_clip model name, local-dir:/path (config + weights), or 'ecif-tiny'",
    )
    p.add_argument(
        "--pretrained",
        default="auto",
        help="pretrained tag (needs a download or the local cache), a checkpoint file, or "
        "'auto' (the model's first listed tag; ignored for local-dir: and ecif-tiny)",
    )
    p.add_argument(
        "--id-col",
        default=None,
        help="id column; if not given: key, uid or id, else the image path or shard-row",
    )
    p.add_argument(
        "--caption-col", default=None, help="caption column; if not given: caption, txt or text"
    )
    p.add_argument(
        "--image-col",
        default=None,
        help="image bytes or path column; if not given: jpg, png, ..., path",
    )
    p.add_argument(
        "--batch-size", type=common.positive_int, default=256, help="rows per forward pass"
    )
    p.add_argument(
        "--num-workers", type=common.non_negative_int, default=2, help="DataLoader decode workers"
    )
    p.add_argument(
        "--distributor",
        default="local",
        choices=["local", "dask"],
        help="local: in-process; dask: one task per shard (paths must be shared by workers)",
    )
    p.add_argument(
        "--scheduler", default=None, help="Dask scheduler address, tcp://host:port (dask only)"
    )
    p.add_argument(
        "--cache-features",
        default=None,
        choices=["projection", "lora"],
        help="also store, per pair, the frozen trunk's output that enters the trainable part "
        "(projection: the pooled image and text features before the model's output "
        "projections; lora: the token states entering block L-k of each tower, k = "
        "--cache-blocks; float16, in features/ with the trainable part's initial weights), so "
        "an influence audit through the model itself (ecif score --params projection) "
        "reads them instead of running the model again; the embeddings are unchanged",
    )
    p.add_argument(
        "--cache-blocks",
        type=int,
        default=1,
        help="with --cache-features lora: k, the number of last blocks of each tower the cache "
        "stops before (the blocks LoRA adapters can go into)",
    )
    common.add_device(p)
    common.add_quiet(p)


def run(args: argparse.Namespace) -> int:
    from ecif.data.embed import embed

    res = embed(
        args.inputs,
        args.output,
        model=args.model,
        pretrained=args.pretrained,
        id_col=args.id_col,
        caption_col=args.caption_col,
        image_col=args.image_col,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        progress=common.show_progress(args),
        distributor=args.distributor,
        scheduler=args.scheduler,
        cache_features=args.cache_features,
        cache_blocks=args.cache_blocks,
    )
    kinds = ", ".join(f"{c} x {k}" for k, c in sorted(res.errors.items()))
    if res.failed and not res.ok and not res.skipped:
        print(
            f"error: every row failed ({res.failed}: {kinds}); nothing usable in {res.folder} "
            "(see error_message in its metadata/)",
            file=sys.stderr,
        )
        return 2
    print(res.summary())
    for kind, count in sorted(res.errors.items()):
        print(f"  failed rows: {count} x {kind}", file=sys.stderr)
    return 0
