"""Trace-back: how much the nearest-neighbour candidate cut loses, and what a query costs.

    python benchmarks/bench_trace.py recall --data shapes      # 2000 shapes pairs, tiny CLIP
    python benchmarks/bench_trace.py recall --data synthetic --n 20000
    python benchmarks/bench_trace.py latency --n 1000000 --d 512
    python benchmarks/bench_trace.py norms --data shapes

recall: for mispredicted validation pairs (image -> text retrieval against the validation
captions; identical captions count as right), rank EVERY training pair by relative influence
(exhaustive) and report the fraction of its top-k responsible (and top-k helped) pairs that
the FAISS candidate set of a given size contains. Two candidate rules: image-side neighbours
of the query image + text-side neighbours of its caption ("img+cap"), and the same plus
text-side neighbours of the wrong answer the model gave ("+wrong", what `ecif trace` uses).

latency: synthetic unit embeddings (float16 memmaps, as clip-retrieval stores them), an IVF
index per side, a head that is a random perturbation of the identity (a query's cost does not
depend on M's values; fitting 1M pairs is not what this measures), EK-FAC on a Hessian
subsample; per query: FAISS search, query gradient + w = H^-1 g, and the candidate ranking
with the per-pair norms precomputed (their index-time cost is timed on a slice of batches).

norms: the exhaustive trace-back lists with exact ||d_n|| against K-probe estimates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import ecif
from ecif.audit.trace import TraceBack, TraceQuery, query_loss_and_gradient
from ecif.audit.trace_args import TraceArgs
from ecif.audit.trace_cache import build_context, load_context, trace_solver
from ecif.data.index import VectorIndex
from ecif.engine.batches import make_partition
from ecif.engine.head import Head
from ecif.engine.relative import exact_norms, probe_norms


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def synthetic_sets(n, d, classes, noise, seed, spread=1.0):
    g = np.random.default_rng(seed)
    a = _unit(g.standard_normal((classes, d)))
    b = a @ np.linalg.qr(g.standard_normal((d, d)))[0]

    def make(m, shuffle):
        c = g.integers(0, classes, m)
        x = _unit(a[c] + spread * g.standard_normal((m, d)) / np.sqrt(d))
        y = _unit(b[c] + spread * g.standard_normal((m, d)) / np.sqrt(d))
        cap = np.array([f"class {k}" for k in c], dtype=object)
        bad = g.choice(m, int(shuffle * m), replace=False)
        y[bad], cap[bad] = y[np.roll(bad, 1)], cap[np.roll(bad, 1)]
        import pandas as pd

        return ecif.EmbeddingSet(x, y, metadata=pd.DataFrame({"caption": cap}))

    return make(n, noise), make(500, 0.0)


def recall(args) -> None:
    if args.data == "shapes":
        train, val = ecif.datasets.shapes_sets(n=args.n, noise=0.2, n_val=500, seed=args.seed)
    else:
        train, val = synthetic_sets(args.n, args.d, args.classes, 0.2, args.seed, args.spread)
    t0 = time.perf_counter()
    head = ecif.fit(train, batch_size=args.batch_size, seed=args.seed)
    print(f"{args.data}: {train}, fit {time.perf_counter() - t0:.1f} s, P = {head.num_params}")
    tb = TraceBack(head, train)
    queries = []
    for qid in val.ids:
        q = tb.query_from_set(val, qid)
        info, _ = query_loss_and_gradient(head, q)
        if not info["correct"]:
            queries.append((q, q.candidates[info["predicted_index"]]))
        if len(queries) >= args.queries:
            break
    print(f"{len(queries)} mispredicted validation queries; k = {args.k}")
    counts = [c for c in args.counts if c < len(train)]
    hits = {(rule, side, c): [] for rule in ("img+cap", "+wrong") for side in "rh" for c in counts}
    t_full = t_cand = 0.0
    for q, wrong in queries:
        t0 = time.perf_counter()
        full = tb.rank(q)
        t_full += time.perf_counter() - t0
        rel = full["relative_influence"].to_numpy()
        top = {"r": set(np.argsort(rel)[: args.k]), "h": set(np.argsort(-rel)[: args.k])}
        for rule, w in (("img+cap", None), ("+wrong", wrong)):
            for c in counts:
                t0 = time.perf_counter()
                cand = set(tb.candidates(q, c, w).tolist())
                t_cand += time.perf_counter() - t0
                for side in "rh":
                    hits[(rule, side, c)].append(len(top[side] & cand) / args.k)
    print(f"exhaustive ranking: {t_full / max(len(queries), 1):.2f} s/query")
    print("| candidates | share of N | responsible img+cap | responsible +wrong | helped +wrong |")
    print("|---|---|---|---|---|")
    for c in counts:
        r1 = np.mean(hits[("img+cap", "r", c)])
        r2 = np.mean(hits[("+wrong", "r", c)])
        h2 = np.mean(hits[("+wrong", "h", c)])
        print(f"| {c} | {c / len(train):.1%} | {r1:.2f} | {r2:.2f} | {h2:.2f} |")


def norms(args) -> None:
    """How much the K-probe estimate of ||d_n|| moves the exhaustive trace-back lists."""
    if args.data == "shapes":
        train, val = ecif.datasets.shapes_sets(n=args.n, noise=0.2, n_val=500, seed=args.seed)
    else:
        train, val = synthetic_sets(args.n, args.d, args.classes, 0.2, args.seed, args.spread)
    head = ecif.fit(train, batch_size=args.batch_size, seed=args.seed)
    tb = TraceBack(head, train)
    x, y = train.image, train.text
    t0 = time.perf_counter()
    exact = exact_norms(head, x, y, tb.inverse)
    t_exact = time.perf_counter() - t0
    print(f"{args.data}: {train}, P = {head.num_params}, exact norms {t_exact:.1f} s")
    queries = []
    for qid in val.ids:
        q = tb.query_from_set(val, qid)
        if not query_loss_and_gradient(head, q)[0]["correct"]:
            queries.append(q)
        if len(queries) >= args.queries:
            break
    tb.norms = exact
    ref = [tb.rank(q)["relative_influence"].to_numpy() for q in queries]
    print(f"{len(queries)} mispredicted queries, every pair ranked; k = {args.k}")
    print(
        "| probes | time | median abs rel. error of the norm | Spearman of rIS | top-k responsible"
        " kept | top-k helped kept | the same after exact re-scoring of each side's top "
        f"{args.refine} |"
    )
    print("|---|---|---|---|---|---|---|")
    for k in args.counts:
        t0 = time.perf_counter()
        est = probe_norms(head, x, y, tb.inverse, probes=k, seed=args.seed + 1)
        t_est = time.perf_counter() - t0
        tb.norms = est
        sp, kept = [], {False: [], True: []}
        for refine in (False, True):
            tb.norms_estimated, tb.args.refine = refine, args.refine
            for q, r in zip(queries, ref, strict=True):
                v = tb.rank(q)["relative_influence"].to_numpy()
                if not refine:
                    sp.append(spearmanr(v, r)[0])
                kept[refine].append(
                    (
                        len(set(np.argsort(v)[: args.k]) & set(np.argsort(r)[: args.k])) / args.k,
                        len(set(np.argsort(-v)[: args.k]) & set(np.argsort(-r)[: args.k])) / args.k,
                    )
                )
        err = np.median(np.abs(est / exact - 1))
        raw, fine = np.mean(kept[False], axis=0), np.mean(kept[True], axis=0)
        print(
            f"| {k} | {t_est:.1f} s | {err:.3f} | {np.mean(sp):.3f} | {raw[0]:.2f} | {raw[1]:.2f} "
            f"| {fine[0]:.2f} / {fine[1]:.2f} |"
        )


def latency(args) -> None:
    d, n = args.d, args.n
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-trace-"))
    g = np.random.default_rng(args.seed)
    paths = {s: tmp / f"{s}_{n}_{d}.npy" for s in ("image", "text")}
    if not all(p.exists() for p in paths.values()):
        t0 = time.perf_counter()
        cen = _unit(g.standard_normal((1000, d)))
        for p in paths.values():
            mm = np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(n, d))
            for s in range(0, n, 100_000):
                m = min(100_000, n - s)
                block = cen[g.integers(0, 1000, m)] + 0.7 * g.standard_normal((m, d)) / np.sqrt(d)
                mm[s : s + m] = _unit(block)
            mm.flush()
            del mm
        print(f"wrote synthetic embeddings in {time.perf_counter() - t0:.1f} s")
    x, y = (np.load(paths[s], mmap_mode="r") for s in ("image", "text"))
    train = ecif.EmbeddingSet(x, y, check_finite=False)
    idx = {}
    ixdir = tmp / f"index_{n}_{d}_{args.kind}_{args.nlist}"
    for side, arr in (("image", x), ("text", y)):
        t0 = time.perf_counter()
        if (ixdir / f"{side}.faiss").exists():
            idx[side] = VectorIndex.load(ixdir, side)
            idx[side].set_nprobe(args.nprobe)
            how = "loaded"
        else:
            idx[side] = VectorIndex.build(
                arr,
                side=side,
                kind=args.kind,
                nlist=args.nlist,
                nprobe=args.nprobe,
                train_rows=args.train_rows,
            )
            idx[side].save(ixdir)
            how = "built"
        print(
            f"{side} index ({idx[side].info.kind}, nlist {idx[side].info.nlist}) {how}: "
            f"{time.perf_counter() - t0:.1f} s"
        )
    tg = torch.Generator().manual_seed(args.seed)
    m0 = torch.eye(d)
    head = Head(
        m=m0 + 0.01 * torch.randn(d, d, generator=tg),
        m0=m0,
        log_scale=float(np.log(100.0)),
        log_scale0=float(np.log(100.0)),
        learn_scale=False,
        lam=1e-3,
        partition=make_partition(n, args.batch_size, args.seed),
        n_norm=n,
    )
    t0 = time.perf_counter()
    inv = trace_solver(head, x, y, "ekfac", hessian_batches=args.hessian_batches)
    print(f"EK-FAC on {args.hessian_batches} batches: {time.perf_counter() - t0:.1f} s")
    # the per-pair norms are an index-time cost: time them on a slice of batches, extrapolate
    sub = Head(**{**vars(head), "partition": _first_batches(head.partition, args.norm_batches)})
    t0 = time.perf_counter()
    probe_norms(sub, x, y, inv, probes=args.probes)
    per_batch = (time.perf_counter() - t0) / args.norm_batches
    print(
        f"pair norms ({args.probes} probes): {per_batch:.2f} s/batch on {args.norm_batches} "
        f"batches -> {per_batch * head.partition.num_batches / 60:.1f} min for all {n:,} pairs"
    )
    t0 = time.perf_counter()
    ctx = load_context(tmp, head)
    how = "loaded"
    if ctx is None:
        ctx, _ = build_context(tmp, head, x, y, progress=False)
        how = "built"
    print(f"batch context ({how}): {time.perf_counter() - t0:.1f} s")
    norms = np.ones(n)  # a query's cost does not depend on the norms' values
    targs = TraceArgs(context_top=args.top, query_threads=args.query_threads)
    tb = TraceBack(head, train, idx, targs, norms=norms, context=ctx)
    tb.inverse = inv
    qrows = g.choice(n, args.queries, replace=False)
    print(
        f"torch threads {torch.get_num_threads()} (queries {args.query_threads}); "
        f"faiss nprobe {args.nprobe}; {_load()}"
    )
    print(
        "| candidates | distinct batches | search ms | gradient + solve ms | numerators from "
        f"whole batches ms | numerators from the context (top {args.top}) ms | total ms | "
        f"exact re-scoring of 2 x {args.refine} ms | total with it ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for count in args.counts:
        times = []
        nb = []
        for r in qrows:
            xq = _unit(np.asarray(x[r], dtype=np.float64))
            cls = _unit(np.asarray(y[g.choice(n, 100, replace=False)], dtype=np.float64))
            pos = np.zeros(100, dtype=bool)
            pos[0] = True
            q = TraceQuery("image->text", xq, cls, pos, [], image=xq, text=cls[0])
            t0 = time.perf_counter()
            rows = tb.candidates(q, count)
            t1 = time.perf_counter()
            info, grad = query_loss_and_gradient(head, q)
            inv.solve(grad)
            t2 = time.perf_counter()
            tb.norms_estimated, tb.context = False, None
            tb.rank(q, rows)  # gradient + solve again, then the numerators from whole batches
            t3 = time.perf_counter()
            tb.context = ctx
            ranked = tb.rank(q, rows)  # the numerators from the stored batch context
            t4 = time.perf_counter()
            assert ranked.attrs["norm"] == "precomputed"
            tb.norms_estimated, tb.args.refine = True, args.refine
            tb.rank(q, rows)  # the same + exact norms for each side's top rows
            t5 = time.perf_counter()
            solve = t2 - t1
            times.append((t1 - t0, solve, t3 - t2 - solve, t4 - t3 - solve, t5 - t4 - (t4 - t3)))
            nb.append(len(np.unique(head.partition.batch_of()[rows])))
        s, w, rb, rc, rf = (1000 * np.median(v) for v in zip(*times, strict=True))
        print(
            f"| {count} | {np.median(nb):.0f} | {s:.0f} | {w:.0f} | {rb:.0f} | {rc:.0f} | "
            f"{s + w + rc:.0f} | {rf:.0f} | {s + w + rc + rf:.0f} |"
        )


def _first_batches(part, k):
    from ecif.engine.batches import Partition

    return Partition(index=part.index[:k], n=part.n, batch_size=part.batch_size, seed=part.seed)


def _load() -> str:
    import os

    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("what", choices=["recall", "latency", "norms"])
    ap.add_argument("--data", default="shapes", choices=["shapes", "synthetic"])
    ap.add_argument("--n", type=int, default=None, help="training pairs")
    ap.add_argument("--d", type=int, default=None, help="embedding width (synthetic)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--classes", type=int, default=200, help="synthetic: caption classes")
    ap.add_argument("--spread", type=float, default=1.0, help="synthetic: noise around a class")
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--counts", type=int, nargs="+", default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--kind", default="ivf", choices=["auto", "flat", "ivf"])
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--train-rows", type=int, default=50_000)
    ap.add_argument("--hessian-batches", type=int, default=100)
    ap.add_argument("--probes", type=int, default=64, help="latency: probes for the norms")
    ap.add_argument("--query-threads", type=int, default=1, help="latency: torch threads")
    ap.add_argument("--top", type=int, default=32, help="latency: context members taken")
    ap.add_argument("--refine", type=int, default=30, help="norms: rows re-scored per side")
    ap.add_argument("--norm-batches", type=int, default=20, help="latency: batches timed")
    ap.add_argument("--workdir", default=None, help="where the synthetic memmaps go (reused)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.what == "norms":
        args.n = args.n or 2000
        args.d = args.d or 32
        args.queries = args.queries or 20
        args.counts = args.counts or [8, 16, 32, 64, 128]
        norms(args)
    elif args.what == "recall":
        args.n = args.n or (2000 if args.data == "shapes" else 20000)
        args.d = args.d or 32
        args.queries = args.queries or 20
        args.counts = args.counts or [25, 50, 100, 200, 500, 1000, 2000, 5000]
        recall(args)
    else:
        args.n = args.n or 1_000_000
        args.d = args.d or 512
        args.queries = args.queries or 5
        args.counts = args.counts or [100, 300, 1000]
        latency(args)


if __name__ == "__main__":
    main()
