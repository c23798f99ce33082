"""How a model mode's cost grows with the training set (issue 16): fit, solve and scoring
time, the scoring pass against a plain forward pass of the part, and peak memory, at N, 2N
and 4N pairs.

    python benchmarks/bench_model_cost.py --params projection --sizes 300 600 1200
    python benchmarks/bench_model_cost.py --params lora --sizes 200 400 800

Digits rendered as images (20% mixed noise) are embedded once with the tiny CLIP's feature
cache at the largest size; the smaller sets are its first rows. Each size runs in a fresh
process (``spawn``) so its peak resident memory (``ru_maxrss``) is its own ("RSS added": the
peak's growth after the process loaded its inputs, i.e. what fit, solve and score added;
peak RSS includes torch itself and the cache at the largest size); the figures are
ratios against the smallest size, measured on the same machine in the same run. Default
options throughout: batch 256 (or N/4, whichever is smaller, so every size has >= 4
batches), the calibrated scale and the mode's default pull.

    python benchmarks/bench_model_cost.py --geometry ViT-B-32 --sizes 1000 2000 4000

``--geometry`` with an open_clip config name measures the projection mode at that model's
widths (ViT-B-32: pooled features 768 and 512 wide, projected to 512) without its weights,
which cannot be downloaded here: synthetic pooled features (a shared 32-dimensional latent
seen through a random map per tower, plus as much independent noise), projections drawn as
open_clip initialises them (std width^-1/2), CLIP's scale 100. Timings and memory depend on
the shapes, not on what the weights learned; fit passes and CG iterations do depend on the
data, so read those from the digits rows.

With ``--params lora --geometry ViT-B-32`` only the scoring pass is timed against a forward
pass, at theta_0 plus a small random step (adapters non-zero) along a random direction, no
fit or solve: one float32 pass of a CLIP-width block over a few hundred pairs takes seconds on
a CPU, a fit hundreds of them. The rows are real token states of a randomly initialised
model of that config (random images, random token ids, through its first L-1 blocks).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
import warnings
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

import ecif
from ecif.data.features import load_features
from ecif.data.tiny_clip import tiny_clip
from ecif.engine.encoder_influence import ModelInverse, score_pass
from ecif.engine.encoder_model import chunk_loss, feature_chunks
from ecif.engine.model_mode import ModelArgs, fit_model, loss_gradient

sys.path.insert(0, str(Path(__file__).parent))
from bench_model_mode import calibrated  # noqa: E402


def embed(folder: Path, n: int, seed: int, noise: float, kind: str) -> Path:
    data = ecif.datasets.digits(n, seed=seed, noise=noise, noise_kind="mixed")
    data.to_parquet(folder / "s")
    ecif.embed(folder / "s", folder / "e", model=f"local-dir:{tiny_clip()}", cache_features=kind)
    return folder / "e"


class Synthetic:
    """Pooled features at an open_clip config's widths (see the module docstring): rows of a
    fixed generator, so a smaller set is the first rows of a larger one."""

    def __init__(self, config: str, n: int, seed: int):
        import open_clip

        cfg = open_clip.get_model_config(config)
        if cfg is None:
            raise SystemExit(f"--geometry {config}: not an open_clip config")
        d, wi, wt = cfg["embed_dim"], cfg["vision_cfg"]["width"], cfg["text_cfg"]["width"]
        maps = np.random.default_rng(12345)  # the towers' maps: the same for train and val
        a_img, a_txt = maps.standard_normal((32, wi)), maps.standard_normal((32, wt))
        g = np.random.default_rng(seed)
        z = g.standard_normal((n, 32))
        self.image = z @ a_img + g.standard_normal((n, wi)) * np.sqrt(32)
        self.text = z @ a_txt + g.standard_normal((n, wt)) * np.sqrt(32)
        self.ids = np.arange(n)
        torch.manual_seed(0)
        self.init = {
            "kind": "projection",
            "log_scale": float(np.log(100.0)),
            "tensors": {
                "image_proj": torch.randn(wi, d, dtype=torch.float64) * wi**-0.5,
                "text_proj": torch.randn(wt, d, dtype=torch.float64) * wt**-0.5,
            },
        }


class Rows:
    """The first ``n`` rows of a feature cache, with what the fit reads (image, text, init)."""

    def __init__(self, feats, n: int):
        self.image = np.asarray(feats.image[:n], dtype=np.float64)  # only these rows in RAM
        self.text = np.asarray(feats.text[:n], dtype=np.float64)
        self.ids, self.init = np.asarray(feats.ids)[:n], feats.init


def best_of(run, reps: int = 3) -> float:
    """The fastest of ``reps`` timed calls (the least disturbed by other work)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


def forward(model, train) -> None:
    """A plain forward pass of the part over every batch (the scoring pass's yardstick)."""
    for ch in feature_chunks(train.image, train.text, model.partition, dtype=model.dtype):
        with torch.no_grad():
            model.part.embed(model.theta, ch.image, ch.text)


def lora_shapes(config: str, sizes: list[int], threads: int) -> None:
    """Scoring pass / forward pass of the lora part (last block) at ``config``'s widths."""
    import open_clip

    from ecif.data import lora_features as lf
    from ecif.engine.encoder_model import new_model
    from ecif.engine.lora_part import LoraPart

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = open_clip.create_model(config).eval()  # random init: nothing is downloaded
    n = max(sizes)
    with torch.no_grad():
        size = net.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        images = torch.randn(n, 3, size, size)
        tokens = torch.randint(1, 49000, (n, 77))
        tokens[:, 0], tokens[torch.arange(n), torch.randint(5, 77, (n,))] = 49406, 49407
        image, text, _, _ = lf.encode(net, images, tokens, 1)
    tensors, cfg = lf.lora_init(net, 1)
    part = LoraPart({k: v.double() for k, v in tensors.items()}, cfg, np.log(100.0))
    gen = torch.Generator().manual_seed(1)
    print(
        f"\nlora mode (rank 4, last block), {config} widths, float32, scoring at theta_0 + step\n"
    )
    print("| N | forward s | score s | score/forward |\n|---|---|---|---|")
    for m in sorted(sizes):
        model = new_model(part, m, lam=1.0, batch_size=min(256, m // 4), seed=0,
                          dtype=torch.float32)  # fmt: skip
        step = 1e-2 * torch.randn(model.num_params, generator=gen, dtype=torch.float64)
        model = model.with_theta((model.theta0.double() + step).to(torch.float32))
        w = torch.randn(model.num_params, generator=gen).to(torch.float32)
        rows = Namespace(image=image[:m].numpy(), text=text[:m].numpy())
        f = best_of(lambda model=model, rows=rows: forward(model, rows), reps=2)
        sc = best_of(
            lambda model=model, rows=rows, w=w: score_pass(model, rows.image, rows.text, w), reps=2
        )
        print(f"| {m} | {f:.2f} | {sc:.2f} | {sc / f:.2f} |", flush=True)


def forward_loss(model, train) -> None:
    """The forward pass plus each batch's contrastive loss (its B x B logits): what a
    training step evaluates before its backward pass."""
    for ch in feature_chunks(train.image, train.text, model.partition, dtype=model.dtype):
        with torch.no_grad():
            chunk_loss(model.part, model.theta, ch)


def inputs(source: str, n: int):
    """(train rows, validation set): a feature cache's first ``n`` rows, or synthetic rows at
    an open_clip config's widths (``source`` = "config:NAME")."""
    if source.startswith("config:"):
        return Synthetic(source[7:], n, 0), Synthetic(source[7:], 300, 1000)
    train_dir, val_dir = source.split("|")
    return Rows(load_features(train_dir), n), load_features(val_dir, dtype=np.float64)


def measure(source: str, n: int, params: str, threads: int, out) -> None:
    torch.set_num_threads(threads)
    train, val = inputs(source, n)
    base = ModelArgs(params=params, batch_size=min(256, n // 4), seed=0)
    args = ModelArgs(**{**base.__dict__, "logit_scale": calibrated(val, train.init, base)})
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        model = fit_model(train, train.init, args)
        fit_s = time.perf_counter() - t
    t = time.perf_counter()
    inv = ModelInverse(model, train.image, train.text)
    w = inv.solve(loss_gradient(model, val.image, val.text))
    solve_s = time.perf_counter() - t
    score_s, forward_s, loss_s = (
        best_of(lambda: score_pass(model, train.image, train.text, w)),
        best_of(lambda: forward(model, train)),
        best_of(lambda: forward_loss(model, train)),
    )
    out.put(
        {
            "n": n,
            "fit s": fit_s,
            "fit passes": float(model.info["evaluations"]),
            "converged": bool(model.info["converged"]),
            "solve s": solve_s,
            "CG iterations": float(inv.info.get("iterations", float("nan"))),
            "score s": score_s,
            "score/forward": score_s / forward_s,
            "score/(forward+loss)": score_s / loss_s,
            "peak RSS MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "RSS added MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - loaded,
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", choices=("projection", "lora"), default="projection")
    ap.add_argument("--sizes", type=int, nargs="+", default=[300, 600, 1200])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    ap.add_argument(
        "--geometry",
        default="digits",
        help="digits (the tiny CLIP's feature cache) or an open_clip config name, e.g. "
        "ViT-B-32 (its widths, random weights: synthetic features for projection; for lora "
        "the scoring / forward ratio only)",
    )
    a = ap.parse_args()
    if a.geometry != "digits" and a.params == "lora":
        return lora_shapes(a.geometry, a.sizes, a.threads)
    sizes = sorted(a.sizes)
    ctx = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.geometry == "digits":
            train_dir = embed(tmp / "train", sizes[-1], 0, 0.2, a.params)
            source = f"{train_dir}|{embed(tmp / 'val', 300, 1000, 0.0, a.params)}"
        else:
            source = f"config:{a.geometry}"
        for n in sizes:
            q = ctx.Queue()
            p = ctx.Process(target=measure, args=(source, n, a.params, a.threads, q))
            p.start()
            rows.append(q.get())
            p.join()
            print(rows[-1], flush=True)
    first = rows[0]
    keys = ("fit s", "fit passes", "solve s", "CG iterations", "score s", "RSS added MiB")
    print(f"\n{a.params} mode, {a.geometry}, sizes {sizes}, {a.threads} torch thread(s)\n")
    print("| N | " + " | ".join(keys) + " | score/forward | score/(fwd+loss) | converged |")
    print("|---" * (len(keys) + 4) + "|")
    for r in rows:
        cells = [
            f"{r[k]:.3g} ({r[k] / first[k]:.2f}x)" if first[k] else f"{r[k]:.3g}" for k in keys
        ]
        extra = f"{r['score/forward']:.2f} | {r['score/(forward+loss)']:.2f} | {r['converged']}"
        print(f"| {r['n']} | " + " | ".join(cells) + f" | {extra} |")


if __name__ == "__main__":
    main()
