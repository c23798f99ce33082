"""Images/s of ``ecif.embed`` against a bare open_clip forward loop, same model, same batch.

    python benchmarks/bench_embed.py                           # ViT-B-32 (random init), 192 pairs
    python benchmarks/bench_embed.py --model local-dir:PATH --n 4000
    python benchmarks/bench_embed.py --model ecif-tiny --n 4000  # the cached tiny model

The bare loop gets every image already decoded and preprocessed and every caption already
tokenised, and only runs encode_image + encode_text + normalise (under fp16 autocast on
CUDA, like ecif). ``ecif.embed`` does the whole job from a parquet shard: read, decode,
preprocess, tokenise, forward, write the clip-retrieval folder. Overhead = bare rate / ecif
rate - 1, with ecif timed without model creation (reported separately). Each side runs
``--repeats`` times, alternating, and the best run counts (the dev machine is shared).
Nothing downloads: named models are randomly initialised, the cost is the same.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import ecif
from ecif.data.models import load_model


def bare_loop(lm, images: torch.Tensor, tokens: torch.Tensor, batch: int) -> float:
    """Seconds for a plain forward over pre-decoded tensors."""
    dev = lm.device
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = images[s : s + batch].to(dev)
            t = tokens[s : s + batch].to(dev)
            if dev.startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.float16):
                    u, v = lm.model.encode_image(x), lm.model.encode_text(t)
            else:
                u, v = lm.model.encode_image(x), lm.model.encode_text(t)
            u = torch.nn.functional.normalize(u.float(), dim=-1).cpu()
            v = torch.nn.functional.normalize(v.float(), dim=-1).cpu()
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    data = ecif.datasets.shapes(args.n, seed=0, image_size=64)
    data.to_parquet(tmp / "shards", shard_size=args.n)  # jpg bytes, one shard
    t0 = time.perf_counter()
    lm = load_model(args.model, None, args.device, random_init=True)
    print(f"model {args.model}: created in {time.perf_counter() - t0:.1f} s on {lm.device}")
    blobs = __import__("pandas").read_parquet(tmp / "shards" / "00000.parquet")["jpg"]
    images = torch.stack([lm.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    tokens = lm.tokenizer(data.captions)
    bare_loop(lm, images[: args.batch_size], tokens[: args.batch_size], args.batch_size)  # warm

    bare, ours, model_s = [], [], []
    for r in range(args.repeats):
        bare.append(bare_loop(lm, images, tokens, args.batch_size))
        out = tmp / f"out{r}"
        res = ecif.embed(
            tmp / "shards",
            out,
            model=args.model,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            pretrained=None,
            random_init=True,
        )
        assert res.ok == args.n, res.summary()
        ours.append(res.seconds - res.model_seconds)
        model_s.append(res.model_seconds)
        shutil.rmtree(out)
    b, o = min(bare), min(ours)
    print(
        f"bare open_clip loop : {args.n / b:8.1f} images/s  (runs: {[round(x, 2) for x in bare]} s)"
    )
    print(
        f"ecif.embed          : {args.n / o:8.1f} images/s  (runs: {[round(x, 2) for x in ours]} s,"
    )
    print(f"                      + model creation {min(model_s):.1f} s per call, not counted)")
    print(f"overhead            : {b and (o / b - 1) * 100:+.1f} %  (goal <= 10 % on CPU)")
    print(
        f"| {args.model} | {lm.device} | {args.n} | {args.batch_size} | {args.num_workers} | "
        f"{args.n / b:.1f} | {args.n / o:.1f} | {(o / b - 1) * 100:+.1f} % |"
    )
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
