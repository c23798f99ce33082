"""The model modes' exact Hessian-vector product: reverse over reverse (shipped) against
forward over reverse (the product before), in the same process on the same fit.

    python benchmarks/bench_hvp.py                      # projection and lora, 400 pairs
    python benchmarks/bench_hvp.py --params lora --n 800

Digits rendered as images (20% mixed noise) are embedded once with the tiny CLIP's feature
cache (``bench_model_cost.embed``). For each mode: 20 products at theta_0 plus a small random
step, timed the best of 3 both ways (``EncoderObjective.hvp``, and the same chunks through
``torch.func.jvp`` of the gradient), their largest relative difference, then a whole default
fit (``fit_model``: Newton with CG on these products) each way, timed once, with its Newton
iterations and the largest relative difference of the fitted parameters. Printed: seconds
and the ratio before / shipped.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from bench_model_cost import Rows, best_of, embed
from torch import func

from ecif.data.features import load_features
from ecif.engine import encoder_model
from ecif.engine.encoder_model import EncoderObjective, chunk_loss
from ecif.engine.model_mode import ModelArgs, fit_model, make_part, pull_of


def forward_over_reverse(self, theta, v, ch):
    """The exact product as it was: jvp of the gradient (forward mode through the part)."""
    grad_fn = func.grad(lambda th: chunk_loss(self.model.part, th, ch))
    return func.jvp(grad_fn, (theta,), (v,))[1]


@contextlib.contextmanager
def product(kind: str):
    shipped = EncoderObjective._chunk_product
    if kind == "before":
        EncoderObjective._chunk_product = forward_over_reverse
    try:
        yield
    finally:
        EncoderObjective._chunk_product = shipped


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def one_mode(params: str, rows: Rows, k: int) -> None:
    args = ModelArgs(params=params)
    model = encoder_model.new_model(
        make_part(rows.init, args, rows), len(rows.image), lam=pull_of(args), batch_size=64
    )
    g = torch.Generator().manual_seed(0)
    step = torch.randn(model.num_params, generator=g, dtype=model.dtype)
    theta = model.theta0 + 1e-2 * step / step.norm() * model.theta0.norm()
    model = model.with_theta(theta)
    obj = EncoderObjective(model, rows.image, rows.text, curvature="exact")
    v = torch.randn(k, model.num_params, generator=g, dtype=model.dtype)
    obj.value_and_grad(theta)  # as a fit starts: the part converts its frozen tensors here
    out, secs = {}, {}
    for kind in ("before", "shipped"):
        with product(kind):
            out[kind] = obj.hvp(theta, v)
            secs[kind] = best_of(lambda: obj.hvp(theta, v))
    print(
        f"| {params} | {k} products | {secs['before']:.2f} s | {secs['shipped']:.2f} s | "
        f"{secs['before'] / secs['shipped']:.2f}x | {rel(out['shipped'], out['before']):.1e} |"
    )
    fits, t = {}, {}
    for kind in ("shipped", "before"):  # the shipped one first: any first-use cost is its
        with product(kind):
            t0 = time.perf_counter()
            fits[kind] = fit_model(rows, rows.init, args)
            t[kind] = time.perf_counter() - t0
    iters = "/".join(str(fits[k].info.get("newton_iterations", "?")) for k in ("before", "shipped"))
    print(
        f"| {params} | default fit ({iters} Newton iterations) | {t['before']:.1f} s | "
        f"{t['shipped']:.1f} s | {t['before'] / t['shipped']:.2f}x | "
        f"{rel(fits['shipped'].theta, fits['before'].theta):.1e} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", nargs="+", default=["projection", "lora"])
    ap.add_argument("--n", type=int, default=400, help="training pairs")
    ap.add_argument("--products", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| mode | what | before (forward over reverse) | shipped (reverse over reverse) "
          "| before / shipped | largest relative difference |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for params in args.params:
            folder = embed(Path(tmp) / params, args.n, seed=0, noise=0.2, kind=params)
            one_mode(params, Rows(load_features(folder), args.n), args.products)


if __name__ == "__main__":
    main()
