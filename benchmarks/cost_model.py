"""How long an audit takes on a cluster: passes x (pairs per worker / rate + per-pass latency).

    python benchmarks/cost_model.py                         # the table in benchmarks/README.md
    python benchmarks/cost_model.py --d 512 --passes 120    # without the batch-sample curvature

Every stage of an audit is a number of passes over the training pairs (bench_scale.py
--stages counts them). With W workers each holding N / W pairs in memory, a pass costs

    t_pass = (N / W) / r + L + blocks x P x 4 bytes / B_net

r: pairs a worker processes per second in one pass (measured below), L: the scheduler's
round trip for one pass's tasks, and the last term the partial sums every block sends to
the driver (P = d^2 parameters, one block per 131,072 pairs). Loading the blocks once reads
N x 2 d x 2 bytes (fp16) at B_disk per worker; a worker holds N / W x 4 d bytes.

The rates are the recorded measurements (benchmarks/README.md): the 2-core CPU box's pass
at d = 128 (1M pairs, 3.0 s a pass) and at d = 512 (the scoring pass, 89k pairs/s), and the
H200's (one GPU, launch-bound at batch 256: 0.9M pairs/s at d = 128 in the fit, 3.0M
pairs/s at d = 512 in the scoring pass). Per-pass cost at d = 512 scales the d = 128 rate by
the flops, 8 d^2 + 8 B d per pair, where no d = 512 fit was measured.
"""

from __future__ import annotations

import argparse

BLOCK_PAIRS = 512 * 256
RATES = {  # pairs per second per worker in one pass, by device and width
    ("cpu", 128): 1_000_000 / 3.0,
    ("cpu", 512): 89_000,
    ("gpu", 128): 100_000 / (8.0 / 72),
    ("gpu", 512): 3_000_000,
}


def pass_seconds(n: float, d: int, workers: int, device: str, a) -> float:
    rate = RATES[(device, d)]
    blocks = max(1.0, n / BLOCK_PAIRS)
    reduce = blocks * d * d * 4 / a.net  # every block's partial sums to the driver
    return n / workers / rate + a.latency + reduce


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--d", type=int, nargs="+", default=[128, 512], choices=[128, 512])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8, 1e9])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument(
        "--passes",
        type=float,
        default=None,
        help="passes of a whole audit (default: the measured ones, by d and size)",
    )
    ap.add_argument("--latency", type=float, default=0.05, help="seconds per pass, scheduling")
    ap.add_argument("--net", type=float, default=1.25e9, help="driver bytes/s in (10 Gb/s)")
    ap.add_argument("--disk", type=float, default=5e8, help="bytes/s a worker reads")
    ap.add_argument(
        "--cpu-pass-s",
        type=float,
        help="seconds one CPU worker takes for a pass over 1M pairs at the first --d "
        "(your own bench_scale.py --stages figure: seconds / passes); replaces the recorded rate",
    )
    a = ap.parse_args()
    if a.cpu_pass_s:
        RATES[("cpu", a.d[0])] = 1e6 / a.cpu_pass_s
    print(
        "| d | N | workers | passes | CPU: load + passes = total | GPU: load + passes = total "
        "| memory per worker |"
    )
    print("|---|---|---|---|---|---|---|")
    for d in a.d:
        for n in a.sizes:
            passes = a.passes if a.passes is not None else measured_passes(n, d)
            for w in a.workers:
                load = n / w * 4 * d / a.disk
                cells = []
                for dev in ("cpu", "gpu"):
                    run = passes * pass_seconds(n, d, w, dev, a)
                    cells.append(f"{_t(load)} + {_t(run)} = {_t(load + run)}")
                mem = n / w * 4 * d / 2**30
                print(
                    f"| {d} | {n:.0e} | {w} | {passes:.0f} | {cells[0]} | {cells[1]} | {mem:.1f} GiB |"
                )


def measured_passes(n: float, d: int) -> float:
    """An audit's passes: the recorded bench_scale --stages figures where the batch sample
    is on (it needs 8 pairs a parameter, at most a quarter of the pairs), else without it."""
    sample_pairs = max(256 * 256, 8 * d * d)
    if n >= 4 * sample_pairs:
        return PASSES_SAMPLED
    return PASSES_FULL


PASSES_FULL = 43.0  # 1M clip-like pairs, d = 128, the audit's head: 41.1 + the 2 warm-up epochs
PASSES_SAMPLED = 12.1  # the same with the batch sample (bench_scale.py --stages)


def _t(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


if __name__ == "__main__":
    main()
