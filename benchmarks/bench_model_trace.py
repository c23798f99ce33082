"""What tracing costs on a model-mode audit: `ecif index` (every pair's probe norms through
the fitted part) and each `ecif trace --query-id` after it, against the audit itself; and the
probes' solve at ``--tight-tol`` (1e-4, the default before 2026-12-07) against the default.

    python benchmarks/bench_model_trace.py --sizes 600 2000 5000
    python benchmarks/bench_model_trace.py --params lora --sizes 400

Per size: ``--data`` (digits) with 20% mixed caption noise and 300 clean validation pairs,
embedded by the tiny CLIP with the mode's feature cache; `ecif score --val` with DEFAULT
options, `ecif index` twice (probes solved to ``--tight-tol``, then to the default
``PROBE_SOLVE_TOL``; the same probes), then ``--queries`` traces of validation pairs
(`--test` the validation folder) with each index's norms, all in this process through the
CLI's own entry point. Prints seconds per stage, the index and one trace as multiples of the
audit (a ratio in one process, so the machine's speed cancels), the two indexes' seconds
ratio, the Spearman of their norms and how many of the traces' top-10 lists they share.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_detect import markdown
from bench_model_mode import embedded
from scipy.stats import spearmanr

import ecif
import ecif.engine.model_probes as model_probes
from ecif.audit.model_trace_pair import NORMS_FILE
from ecif.cli import main as cli


def timed(argv: list[str]) -> float:
    """Seconds of one CLI command run in this process (its printout swallowed)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli(argv)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} exited {code}")
    return time.perf_counter() - start


def traces(audit: Path, val: Path, ids: np.ndarray, out: Path) -> tuple[list[float], list]:
    """Seconds of each trace and its (responsible, helped) id sets."""
    seconds, lists = [], []
    for q in ids:
        csv = out / f"{q}.csv"
        seconds.append(
            timed(
                [
                    "trace",
                    str(audit),
                    "--query-id",
                    q,
                    "--test",
                    str(val),
                    "-k",
                    "10",
                    "-o",
                    str(csv),
                ]
            )
        )
        t = pd.read_csv(csv)
        lists.append([set(t.loc[t["list"] == name, "id"]) for name in ("responsible", "helped")])
    return seconds, lists


def one_size(a, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"kind": a.params, "blocks": 1, "data": a.data}
        embedded(tmp / "train", n, a.seed, 0.2, **sets)
        embedded(tmp / "val", 300, a.seed + 1000, 0.0, **sets)
        train, val, audit = tmp / "train" / "e", tmp / "val" / "e", tmp / "audit"
        score = ["score", str(train), "--val", str(val), "-o", str(audit), "--quiet"]
        audit_s = timed([*score, "--params", a.params, "--seed", str(a.seed)])
        ids = np.asarray(ecif.EmbeddingSet.load(val).ids).astype(str)[: a.queries]
        norms_file = audit / "index" / NORMS_FILE
        default_tol = model_probes.PROBE_SOLVE_TOL
        model_probes.PROBE_SOLVE_TOL = a.tight_tol
        try:
            tight_s = timed(["index", str(audit), "--quiet"])
        finally:
            model_probes.PROBE_SOLVE_TOL = default_tol
        tight = np.load(norms_file)["norms"]
        (tmp / "tight").mkdir()
        _, tight_lists = traces(audit, val, ids, tmp / "tight")
        norms_file.unlink()
        index_s = timed(["index", str(audit), "--quiet"])
        norms = np.load(norms_file)["norms"]
        (tmp / "default").mkdir()
        query_s, lists = traces(audit, val, ids, tmp / "default")
    shared = [len(a_ & b_) for t, d in zip(tight_lists, lists) for a_, b_ in zip(t, d)]
    listed = [len(a_) for t in tight_lists for a_ in t]
    return {
        "pairs": n,
        "audit s": round(audit_s, 1),
        f"index s, tol {a.tight_tol:g}": round(tight_s, 1),
        "index s": round(index_s, 1),
        "index speed-up": round(tight_s / index_s, 2),
        "norms Spearman": round(float(spearmanr(tight, norms)[0]), 6),
        "top-10 ids shared": f"{sum(shared)}/{sum(listed)}",
        "trace s, median": round(float(np.median(query_s)), 2),
        "trace s, range": f"{min(query_s):.2f}-{max(query_s):.2f}",
        "index / audit": round(index_s / audit_s, 2),
        "trace / audit": round(float(np.median(query_s)) / audit_s, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", choices=["projection", "lora"], default="projection")
    ap.add_argument("--data", choices=["digits", "shapes"], default="digits")
    ap.add_argument("--sizes", type=int, nargs="+", default=[600, 2000])
    ap.add_argument("--queries", type=int, default=5, help="traces per size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tight-tol", type=float, default=1e-4, help="the probes' CG tolerance to compare with"
    )
    a = ap.parse_args()
    torch.set_num_threads(1)  # the figures of benchmarks/README.md: one thread
    rows = []
    for n in a.sizes:
        rows.append(one_size(a, n))
        print(rows[-1], flush=True)
    print(f"\n{a.params}, {a.data}, seed {a.seed}, {a.queries} traces a size\n")
    print(markdown(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
