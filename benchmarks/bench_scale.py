"""Cost growth: fit + solve + score time and peak memory at several N (synthetic embeddings).

    python benchmarks/bench_scale.py                      # N = 10k, 100k, 1M at d = 128
    python benchmarks/bench_scale.py --sizes 10000 100000 --d 256
    python benchmarks/bench_scale.py --warmup --sizes 100000 1000000   # warm-up vs cold fit
    python benchmarks/bench_scale.py --stages --data clip_like --sizes 100000 1000000
    python benchmarks/bench_scale.py --stages --data aligned --sizes 1000000 --threads 1

--stages: an audit's fit, solve and scoring pass with default options (the scale and pull
``ecif score`` chooses, from a 4,096-pair validation set of the same world), every pass over the
pairs counted (batches computed / batches, so a pass over a batch sample counts its
fraction), with the curvature sample off and on (auto): passes and seconds per stage, and
how far the two runs' head, w and scores are apart.

Each size runs in a fresh subprocess so its peak RSS is its own. The fit is full-batch L-BFGS
(a fixed iteration budget, so time per iteration is comparable across N), the solve is CG on
a fixed-size Hessian subsample, the scoring pass streams every pair. Linear time shows as a
constant time per pair; flat memory as a constant peak above the embeddings.

--warmup: the fit alone, to its gradient tolerance (float32 default 1e-5), from float16
embeddings memory-mapped from .npy files (written in chunks under --workdir), without and
with the streamed minibatch warm-up, each in its own process: wall time, full passes,
warm-up time, final gradient max-abs, max |M_warm - M_cold|, and the peak of anonymous RSS
above the fit's start (the memory-mapped embeddings are file-backed pages, not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


def run_one(n: int, d: int, iters: int) -> dict:
    import torch

    import ecif
    from ecif.engine.influence import loss_gradient, score_pass

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    x /= x.norm(dim=1, keepdim=True)
    y = torch.randn(n, d, generator=g).mul_(0.8).add_(x)
    y /= y.norm(dim=1, keepdim=True)
    train = ecif.EmbeddingSet(x.numpy(), y.numpy(), check_finite=False)
    emb_mb = 2 * n * d * 4 / 2**20
    t0 = time.perf_counter()
    head = ecif.fit(
        train, batch_size=256, optimizer="lbfgs", max_iter=iters, tol=1e-12, warmup_epochs=0
    )
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    inv = ecif.solver(
        head, train, solver="cg", hessian_batches=min(40, head.partition.num_batches), tol=1e-4
    )
    w = inv.solve(loss_gradient(head, x[:4096].numpy(), y[:4096].numpy()))
    t_solve = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_pass(head, train.image, train.text, w)
    t_score = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n": n,
        "fit_s": t_fit,
        "fit_iters": head.info["iterations"],
        "fit_evals": head.info["evaluations"],
        "solve_s": t_solve,
        "score_s": t_score,
        "peak_above_emb_mb": peak - rss0 - emb_mb,
        "emb_mb": emb_mb,
    }


# --data kinds drawn by ecif.datasets.concept_pairs, and their geometry
CONCEPT_KINDS = {"concepts": "clip_like", "aligned": "aligned"}


def validation_pairs(kind: str, d: int):
    """--stages' validation set: 4,096 pairs of the training data's world (trusted: no
    planted noise for the concept kinds)."""
    from ecif.datasets import clip_like_pairs, concept_pairs

    if kind in CONCEPT_KINDS:
        xv, yv, _ = concept_pairs(4096, d, 0.0, seed=999, geometry=CONCEPT_KINDS[kind])
    else:
        xv, yv, _ = clip_like_pairs(4096, d, seed=0, rows_seed=999)
    return xv, yv


def make_memmaps(n: int, d: int, workdir: Path, kind: str) -> tuple[Path, Path]:
    """Unit-norm float16 pairs in .npy files, written 100k rows at a time (flat memory).

    bench: y = normalize(x + 0.8 noise) (the optimum is near a multiple of the identity);
    rotation: y = normalize(x R + noise) (far from the identity start: more L-BFGS passes);
    clip_like: ecif.datasets.clip_like_pairs (anisotropic like CLIP's), one world, rows per block;
    concepts, aligned: ecif.datasets.concept_pairs with that geometry (clip_like's or aligned's),
    20% shuffled captions, one world, rows per block.
    """
    import numpy as np

    px, py = workdir / f"{kind}_{n}_{d}_x.npy", workdir / f"{kind}_{n}_{d}_y.npy"
    if px.exists() and py.exists():
        return px, py
    workdir.mkdir(parents=True, exist_ok=True)
    rot = np.linalg.qr(np.random.default_rng(123).standard_normal((d, d)))[0]
    g = np.random.default_rng(0)
    mx = np.lib.format.open_memmap(px, "w+", np.float16, (n, d))
    my = np.lib.format.open_memmap(py, "w+", np.float16, (n, d))
    for s in range(0, n, 100_000):
        k = min(100_000, n - s)
        x = g.standard_normal((k, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if kind == "clip_like":
            from ecif.datasets import clip_like_pairs

            x, y, _ = clip_like_pairs(k, d, seed=0, rows_seed=s // 100_000)
        elif kind in CONCEPT_KINDS:
            from ecif.datasets import concept_pairs

            geometry = CONCEPT_KINDS[kind]
            x, y, _ = concept_pairs(k, d, 0.2, seed=s // 100_000, geometry=geometry)
        elif kind == "bench":
            y = x + 0.8 * g.standard_normal((k, d))
        else:
            y = x @ rot + 0.6 * g.standard_normal((k, d)) / np.sqrt(d)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        mx[s : s + k], my[s : s + k] = x, y
    mx.flush()
    my.flush()
    del mx, my
    return px, py


def run_fit(px: str, py: str, warmup: str, out: str, threads: int) -> dict:
    import numpy as np
    import torch

    import ecif

    if threads:
        torch.set_num_threads(threads)

    x, y = np.load(px, mmap_mode="r"), np.load(py, mmap_mode="r")
    epochs = None if warmup == "auto" else int(warmup)
    anon0, peak, stop = _rss_anon_mb(), [0.0], threading.Event()

    def sample():  # memory-mapped pages are file-backed: anonymous RSS is all but the embeddings
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _rss_anon_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    head = ecif.fit((x, y), batch_size=256, optimizer="lbfgs", warmup_epochs=epochs)
    t_fit = time.perf_counter() - t0
    stop.set()
    sampler.join()
    torch.save(head.m, out)
    w = head.info["warmup"] or {}
    emb_mb = (x.nbytes + y.nbytes) / 2**20
    return {
        "n": len(x),
        "warmup_epochs": w.get("epochs", 0),
        "fit_s": t_fit,
        "warmup_s": w.get("seconds", 0.0),
        "evals": head.info["evaluations"],
        "grad_max": head.info["grad_max"],
        "converged": head.info["converged"],
        "objective": head.info["objective"],
        "peak_above_emb_mb": max(peak[0], _rss_anon_mb()) - anon0,
        "emb_mb": emb_mb,
    }


def run_stages(
    px: str,
    py: str,
    sample: str,
    out: str,
    threads: int,
    head_kind: str = "audit",
    data: str = "clip_like",
) -> dict:
    """An audit's three stages on memory-mapped pairs, every pass counted (``PassCount``)."""
    import numpy as np
    import torch

    import ecif
    from ecif.audit.selection import choose_head
    from ecif.engine.influence import score_pass
    from ecif.engine.row_sums import LocalRows

    if threads:
        torch.set_num_threads(threads)
    x, y = np.load(px, mmap_mode="r"), np.load(py, mmap_mode="r")
    xv, yv = validation_pairs(data, x.shape[1])
    val = ecif.EmbeddingSet(xv, yv)
    k = None if sample == "auto" else int(sample)
    rows = LocalRows(x, y)
    nb = -(-len(x) // 256)
    # the head an audit fits by default: its scale and pull (ecif.audit.selection)
    # (--head fit: ecif.fit's own defaults, CLIP's scale 100 and lam 1e-3)
    choice = choose_head(val, val)
    scale, lam = (choice.logit_scale, choice.lam) if head_kind == "audit" else (100.0, 1e-3)
    res: dict = {"n": len(x), "logit_scale": scale, "lam": lam}
    t0 = time.perf_counter()
    head = ecif.fit((x, y), rows=rows, sample_batches=k, logit_scale=scale, lam=lam)
    res.update(fit_s=time.perf_counter() - t0, fit_passes=rows.count.computed / nb)
    res.update(grad_max=head.info["grad_max"], converged=head.info["converged"])
    res["fit_full"] = head.info["evaluations"]  # passes over all pairs (the rest: the sample's)
    res["warmup_s"] = (head.info["warmup"] or {}).get("seconds", 0.0)
    t0, before = time.perf_counter(), rows.count.computed
    inv = ecif.solver(head, (x, y), rows=rows, sample_batches=k)
    w = inv.solve(ecif.loss_gradient(head, (xv, yv)))
    res.update(solve_s=time.perf_counter() - t0, solve_passes=(rows.count.computed - before) / nb)
    res.update(cg=inv.info["cg_iterations"], residual=inv.info["cg_rel_residual"])
    t0 = time.perf_counter()
    d_pos, d_neg = score_pass(head, x, y, w)
    res.update(score_s=time.perf_counter() - t0, score_passes=1.0)
    torch.save({"m": head.m, "w": w, "scores": torch.from_numpy(d_pos + d_neg)}, out)
    return res


def stages_table(a) -> None:
    import torch
    from scipy.stats import spearmanr

    print(f"load before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for n in a.sizes:
        px, py = make_memmaps(n, a.d, Path(a.workdir), a.data)
        got = {}
        for sample in ("0", "auto"):
            out = Path(a.workdir) / f"stages_{a.data}_{n}_{a.d}_{sample}_{a.head}.pt"
            record = out.with_suffix(".json")
            if sample == "0" and a.reuse_off and out.exists():
                # the sample-off run does not depend on the sample's code: its saved outputs
                # (and its figures where they were recorded)
                r = json.loads(record.read_text()) if record.exists() else None
                got[sample] = (r, torch.load(out))
                print(f"N={n:>9,}: sample off reused from {out}", flush=True)
                continue
            cmd = [sys.executable, __file__, "--stages-one", str(px), str(py), sample, str(out)]
            cmd += ["--threads", str(a.threads), "--head", a.head, "--data", a.data]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            record.write_text(res.stdout.strip().splitlines()[-1])
            got[sample] = (json.loads(record.read_text()), torch.load(out))
        for sample, (r, _) in got.items():
            if r is None:
                continue
            total = r["fit_passes"] + r["solve_passes"] + r["score_passes"]
            name = "sample off" if sample == "0" else "default (sample auto)"
            print(
                f"N={n:>9,} {a.data} d={a.d} scale {r['logit_scale']:.3g} lam {r['lam']:g} "
                f"{name}: passes fit {r['fit_passes']:.1f} ({r['fit_full']} on all pairs) "
                f"(warm-up {r['warmup_s']:.0f} s aside) + solve {r['solve_passes']:.1f} (CG "
                f"{r['cg']}, residual {r['residual']:.1e}) + score 1 = {total:.1f}; seconds fit "
                f"{r['fit_s']:.0f}, solve {r['solve_s']:.0f}, score {r['score_s']:.1f}; grad max "
                f"{r['grad_max']:.1e} (converged {r['converged']})",
                flush=True,
            )
        (_, a0), (_, a1) = got["0"], got["auto"]
        rho = spearmanr(a0["scores"].numpy(), a1["scores"].numpy())[0]
        dm = float((a0["m"] - a1["m"]).abs().max() / a0["m"].abs().max())
        dw = float((a0["w"] - a1["w"]).norm() / a0["w"].norm())
        print(
            f"N={n:>9,} agreement: max|dM|/max|M| {dm:.1e}, |dw|/|w| {dw:.1e}, "
            f"scores Spearman {rho:.6f}",
            flush=True,
        )
    print(f"load after: {os.getloadavg()[0]:.1f}", flush=True)


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def warmup_table(a) -> None:
    import torch

    print(
        f"load before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
        f"torch threads {a.threads or 'default'}",
        flush=True,
    )
    for n in a.sizes:
        px, py = make_memmaps(n, a.d, Path(a.workdir), a.data)
        rows = {}
        for warmup in ("0", a.warmup_epochs):
            out = Path(a.workdir) / f"m_{a.data}_{n}_{a.d}_{warmup}.pt"
            cmd = [sys.executable, __file__, "--fit-one", str(px), str(py), warmup, str(out)]
            cmd += ["--threads", str(a.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[warmup] = json.loads(res.stdout.strip().splitlines()[-1])
            rows[warmup]["m"] = torch.load(out)
        cold, warm = rows["0"], rows[a.warmup_epochs]
        diff = float((warm["m"] - cold["m"]).abs().max())
        for name, r in (("cold", cold), ("warm", warm)):
            per_pass = (r["fit_s"] - r["warmup_s"]) / r["evals"]
            print(
                f"N={n:>9,} {a.data} {name}: fit {r['fit_s']:6.1f} s = warm-up "
                f"{r['warmup_s']:5.1f} s ({r['warmup_epochs']} epochs, "
                f"{r['warmup_s'] / per_pass:.1f} pass-equivalents) + {r['evals']} full passes "
                f"({per_pass:.2f} s each); grad max {r['grad_max']:.1e} "
                f"(converged {r['converged']}), J {r['objective']:.6f}; peak above embeddings "
                f"{r['peak_above_emb_mb']:.0f} MB (embeddings {r['emb_mb']:.0f} MB)",
                flush=True,
            )
        print(f"N={n:>9,} {a.data}: max |M_warm - M_cold| = {diff:.1e}", flush=True)
    print(f"load after: {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30, help="L-BFGS iteration budget per fit")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", action="store_true", help="compare the fit without/with warm-up")
    ap.add_argument(
        "--warmup-epochs", default="auto", help="warm-up epochs for --warmup (default auto)"
    )
    ap.add_argument(
        "--data",
        choices=["bench", "rotation", "clip_like", *CONCEPT_KINDS],
        default="bench",
        help="--warmup and --stages data",
    )
    ap.add_argument("--workdir", default="/tmp/ecif_bench_scale", help="--warmup memmap folder")
    ap.add_argument("--threads", type=int, default=0, help="--warmup: torch threads (0: default)")
    ap.add_argument("--fit-one", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--stages", action="store_true", help="passes per stage, sample off vs auto")
    ap.add_argument("--stages-one", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument(
        "--reuse-off",
        action="store_true",
        help="--stages: reuse the sample-off run's saved outputs under --workdir if present",
    )
    ap.add_argument(
        "--head",
        choices=["audit", "fit"],
        default="audit",
        help="--stages: the head an audit chooses, or ecif.fit's defaults (scale 100, lam 1e-3)",
    )
    a = ap.parse_args()
    if a.fit_one:
        print(json.dumps(run_fit(*a.fit_one, a.threads)))
        return
    if a.stages_one:
        print(json.dumps(run_stages(*a.stages_one, a.threads, a.head, a.data)))
        return
    if a.stages:
        stages_table(a)
        return
    if a.warmup:
        warmup_table(a)
        return
    if a.one:
        print(json.dumps(run_one(a.one, a.d, a.iters)))
        return
    rows = []
    for n in a.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--d", str(a.d), "--iters", str(a.iters)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"N={n:>9,}: fit {r['fit_s']:7.1f} s ({r['fit_evals']} evals, "
            f"{r['fit_s'] / r['fit_evals'] / n * 1e6:.2f} us/pair/eval), solve {r['solve_s']:5.1f} s, "
            f"score {r['score_s']:6.1f} s ({r['score_s'] / n * 1e6:.2f} us/pair), "
            f"peak above embeddings {r['peak_above_emb_mb']:.0f} MB (embeddings {r['emb_mb']:.0f} MB)",
            flush=True,
        )


if __name__ == "__main__":
    main()
