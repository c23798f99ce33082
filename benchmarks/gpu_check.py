"""A short check of the GPU paths, for a lent GPU machine (under 5 minutes).

    python benchmarks/gpu_check.py                 # device auto (cuda when present)
    python benchmarks/gpu_check.py --device cpu --n 20000 --images 256   # dry run anywhere

Prints, for the chosen device: (1) `ecif.embed` images/s with the tiny CLIP (fp16 autocast on
CUDA) on shapes shards, (2) the scoring pass on N synthetic pairs (d = 512) in pairs/s with
its FLOP rate against a same-device fp32 matmul, plus the CPU/GPU score agreement on a slice,
(3) FAISS: index build and k=100 search latency (GPU index when faiss sees a GPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def check_embed(device: str, n_images: int, tmp: Path) -> None:
    import ecif
    from ecif.data.tiny_clip import tiny_clip

    data = ecif.datasets.shapes(n=n_images, seed=0)
    data.to_parquet(tmp / "shards", shard_size=max(1, n_images // 2))
    model = f"local-dir:{tiny_clip()}"
    t0 = time.perf_counter()
    res = ecif.embed(tmp / "shards", tmp / "emb", model=model, device=device, batch_size=256)
    dt = time.perf_counter() - t0
    print(
        f"embed ({device}): {res.ok} images in {dt:.1f} s = {res.ok / dt:,.0f} images/s; {res.summary()}"
    )


def synthetic_head(n: int, d: int, device: str):
    from ecif.engine.batches import make_partition
    from ecif.engine.head import Head

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    x /= x.norm(dim=1, keepdim=True)
    y = torch.randn(n, d, generator=g).mul_(0.8).add_(x)
    y /= y.norm(dim=1, keepdim=True)
    m0 = torch.eye(d)
    head = Head(
        m=(m0 + 0.01 * torch.randn(d, d, generator=g)).to(device),
        m0=m0.to(device),
        log_scale=float(np.log(100.0)),
        log_scale0=float(np.log(100.0)),
        learn_scale=False,
        lam=1e-3,
        partition=make_partition(n, 256, 0),
        n_norm=n,
    )
    return head, x, y


def check_scoring(device: str, n: int, d: int = 512) -> None:
    from dataclasses import replace

    from ecif.engine.influence import score_pass

    head, x, y = synthetic_head(n, d, device)
    xd, yd = x.to(device), y.to(device)
    w = 0.01 * torch.randn(d * d, device=device)
    a = torch.randn(8192, d, device=device)
    b = torch.randn(d, 2 * d, device=device)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    rate = 2.0 * 8192 * d * 2 * d * 50 / (time.perf_counter() - t0) / 1e9
    from ecif.engine.batches import make_partition

    warm = replace(head, partition=make_partition(4096, 256, 0), n_norm=4096)
    score_pass(warm, xd[:4096], yd[:4096], w)  # warm-up (kernels, allocator)
    t0 = time.perf_counter()
    d_pos, d_neg = score_pass(head, xd, yd, w)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    flops = head.partition.num_batches * (4.0 * 256 * d * d + 4.0 * 256 * 256 * d)
    print(f"matmul ({device}, fp32): {rate:,.0f} GFLOP/s")
    print(
        f"scoring ({device}): {n:,} pairs in {dt:.2f} s = {n / dt:,.0f} pairs/s; {flops / dt / 1e9:,.0f} GFLOP/s = {flops / dt / 1e9 / rate:.0%} of matmul"
    )
    if device != "cpu":
        k = 256 * 64
        cpu_head = replace(head, m=head.m.cpu(), m0=head.m0.cpu(), partition=head.partition)
        cp, cn = score_pass(cpu_head, x, y, w.cpu())
        rel = np.nanmax(np.abs((cp + cn)[:k] - (d_pos + d_neg)[:k])) / np.nanmax(np.abs(cp + cn))
        print(f"CPU vs {device} scores: max relative difference {rel:.1e}")


def check_faiss(device: str, n: int, d: int = 512) -> None:
    from ecif.data.index import VectorIndex, gpu_available

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, d)).astype(np.float32)
    t0 = time.perf_counter()
    idx = VectorIndex.build(vecs, side="image", device=device)
    t_build = time.perf_counter() - t0
    q = vecs[:32]
    idx.search(q[:1], 100)
    t0 = time.perf_counter()
    for i in range(32):
        idx.search(q[i : i + 1], 100)
    per = (time.perf_counter() - t0) / 32 * 1000
    print(
        f"faiss ({device}, GPU available: {gpu_available()}): build {t_build:.1f} s, search k=100: {per:.1f} ms/query"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--n", type=int, default=1_000_000, help="pairs for scoring and FAISS")
    ap.add_argument("--images", type=int, default=4000, help="images for the embedding check")
    args = ap.parse_args()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    print(
        f"device: {device}; torch {torch.__version__}; cuda available {torch.cuda.is_available()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        section("embedding")
        check_embed(device, args.images, Path(tmp))
    section("scoring")
    check_scoring(device, args.n)
    section("faiss")
    check_faiss(device, args.n)


if __name__ == "__main__":
    main()
