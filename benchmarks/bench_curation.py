"""Curation judged as curators judge it: filter a noisy set, train a CLIP on what is kept.

    python benchmarks/bench_curation.py                  # digits, 5 paired seeds, both regimes
    python benchmarks/bench_curation.py --dataset shapes --out curation_shapes.md
    python benchmarks/bench_curation.py --quick          # smoke run (minutes): not a result
    python benchmarks/bench_curation.py --seed-start 3 --seeds 2 --csv b.csv   # seeds 3, 4
    python benchmarks/bench_curation.py --report a.csv b.csv   # one report from split runs
    python benchmarks/bench_curation.py --detect-only --model-modes   # filters' APs only

For every seed: a noisy training set (``noise_kind="mixed"``: random shuffles, confusable
swaps, one-attribute edits) of digits (scikit-learn scans, a domain the tiny CLIP never saw)
or shapes, a small clean validation set (ecif's trusted set) and a clean held-out test set.
The pretrained tiny CLIP embeds the pairs; every filter ranks them; each filter drops the
same budgets (the true noise count and twice it). Then a CLIP is trained on what each keeps,
(a) fine-tuning the pretrained tiny CLIP and (b) from scratch, with the same steps, schedule
and seed for every filter (paired), and tested on the held-out set: zero-shot classification
with class prompts and image<->text recall@1/5. The oracle drops exactly the noisy pairs.
Markdown tables (means with 95% t intervals over seeds, paired differences against no
filtering), a raw CSV and an SVG figure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ecif
from ecif.audit import AuditArgs, Auditor
from ecif.audit.baselines import cosine, lemon, loss_mixture, neg_clip_loss
from ecif.audit.metrics import average_precision
from ecif.audit.retrain import (
    RetrainConfig,
    create,
    encode_images,
    encode_texts,
    evaluate,
    retrain,
)
from ecif.engine.influence import loss_gradient, score_pass

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curation_report import report, svg_figure  # noqa: E402

FILTERS = (
    "random",
    "clip_score",
    "negCLIPLoss",
    "loss+GMM",
    "LEMoN",
    "TracIn",
    "ecif (head)",
)


def _digit_prompts() -> list[str]:
    from ecif.data import digits as dg

    return [f"a {s} {c} digit {{}} on {b}" for s in dg.SIZES for c in dg.COLOURS for b in dg.BACKGROUNDS]  # fmt: skip


def _shape_prompts() -> list[str]:
    from ecif.data import shapes as sh

    return [
        sh.caption_of("{}", c, s, p, b)
        for s in sh.SIZES for c in sh.COLOURS for p in sh.POSITIONS for b in sh.BACKGROUNDS
    ]  # fmt: skip


# classes, the frame column holding each test image's class, and the zero-shot prompts: the
# training caption with the class left open, ensembled over the other attributes' values
DATASETS = {
    "digits": (
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        "digit",
        _digit_prompts,
    ),
    "shapes": (("circle", "square", "triangle", "cross"), "shape", _shape_prompts),
}


def make_data(name: str, n: int, seed: int, noise: float):
    if name == "digits":
        return ecif.datasets.digits(n, seed=seed, noise=noise, noise_kind="mixed")
    return ecif.datasets.shapes(n, seed=seed, noise=noise, noise_kind="mixed")


def embed_pairs(net, tok, data, logit_scale: float) -> ecif.EmbeddingSet:
    """The pretrained model's embeddings, in memory (as `ecif embed` would, without float16)."""
    with torch.no_grad():
        x = encode_images(net, data.images).numpy()
        y = encode_texts(net, tok, data.captions).numpy()
    es = ecif.EmbeddingSet(x, y, ids=data.frame["key"].to_numpy())
    es.logit_scale = logit_scale
    return es


def suspicion_scores(
    train: ecif.EmbeddingSet, val: ecif.EmbeddingSet, seed: int, probes: float | None = None
) -> dict:
    """Every filter's suspicion (higher = dropped first), one array per filter, train order.
    ``probes``: the head mode's probe fraction (None: ecif's default)."""
    opts = {} if probes is None else {"probes": probes}
    aud = Auditor(train, val, AuditArgs(seed=seed, **opts))
    table = aud.run()
    head = aud.heads[0]
    x, y = np.asarray(train.image), np.asarray(train.text)
    g = loss_gradient(head, val.image, val.text)
    d_pos, d_neg = score_pass(head, x, y, g)
    loss = table["pair_loss"].to_numpy(np.float64)
    return {
        "random": np.random.default_rng(10_000 + seed).random(len(train)),
        "clip_score": -cosine(x, y),
        "negCLIPLoss": neg_clip_loss(x, y, logit_scale=head.logit_scale, seed=seed),
        # the mixture's posterior saturates; per-pair loss breaks its ties
        "loss+GMM": loss_mixture(loss) + 1e-9 * (loss - loss.min()) / np.ptp(loss).clip(1e-12),
        "LEMoN": lemon(x, y),
        "TracIn": -(d_pos + d_neg),  # identity Hessian: w = g_val
        "ecif (head)": table["misalign_score"].to_numpy(),
    }


def model_mode_scores(train_d, val_d, params: str, seed: int, base: str) -> np.ndarray:
    """What `ecif score --params projection|lora` ranks by (misalign_score, defaults), in the
    training set's order: both sets embedded with their feature caches, as a user would."""
    from ecif.audit.retrain import model_spec
    from ecif.data.features import load_features

    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, data in (("train", train_d), ("val", val_d)):
            data.to_parquet(Path(tmp) / name)
            out = Path(tmp) / f"{name}_emb"
            ecif.embed(Path(tmp) / name, out, model=model_spec(base), cache_features=params)
            folders[name] = out
        train = ecif.EmbeddingSet.load(folders["train"])
        val = ecif.EmbeddingSet.load(folders["val"])
        aud = Auditor(
            train,
            val,
            AuditArgs(params=params, seed=seed),
            train_features=load_features(folders["train"]),
            val_features=load_features(folders["val"]),
        )
        table = aud.run().set_index("id")
    keys = train_d.frame["key"].astype(str).to_numpy()
    return table["misalign_score"].reindex(keys).to_numpy()


def keep_sets(scores: dict, noisy: np.ndarray, budgets: list[int]) -> dict:
    """name -> (filter, budget label, keep mask): none, the oracle, every filter x budget."""
    n = len(noisy)
    out = {"none": ("none", "0", np.ones(n, bool)), "oracle": ("oracle", "noisy", ~noisy)}
    for name, s in scores.items():
        order = np.argsort(-np.nan_to_num(s, nan=-np.inf), kind="stable")
        for b, k in zip(("1x", "2x"), budgets):
            mask = np.ones(n, bool)
            mask[order[:k]] = False
            out[f"{name}@{b}"] = (name, b, mask)
    return out


def one_seed(args, seed: int, base: str, log) -> tuple[list[dict], list[dict]]:
    classes, label_col, prompts = DATASETS[args.dataset]
    template = prompts()
    train_d = make_data(args.dataset, args.n, seed, args.noise)
    val_d = make_data(args.dataset, args.n_val, 10_000 + seed, 0.0)
    test_d = make_data(args.dataset, args.n_test, 20_000 + seed, 0.0)
    noisy = train_d.frame["is_corrupted"].to_numpy(bool)
    net, tok = create(base, "finetune")
    scale = float(net.logit_scale.detach().exp())
    train = embed_pairs(net, tok, train_d, scale)
    val = embed_pairs(net, tok, val_d, scale)
    t0 = time.perf_counter()
    scores = suspicion_scores(train, val, seed, args.probes)
    for params in args.model_modes:
        scores[f"ecif ({params})"] = model_mode_scores(train_d, val_d, params, seed, base)
    log(f"seed {seed}: scores in {time.perf_counter() - t0:.0f} s")
    det = [
        {"seed": seed, "filter": k, "ap": average_precision(noisy, np.nan_to_num(v, nan=-np.inf))}
        for k, v in scores.items()
    ]
    if args.detect_only:
        return [], det
    k1 = int(noisy.sum())
    sets = keep_sets(scores, noisy, [k1, min(2 * k1, args.n - 2)])
    labels = np.array([classes.index(c) for c in test_d.frame[label_col]])
    cfg = RetrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed, device=args.device
    )
    rows = []
    if args.csv and partial_path(args.csv, seed).exists():  # resume: finished trainings stay
        rows = pd.read_csv(partial_path(args.csv, seed), dtype={"budget": str}).to_dict("records")
        log(f"seed {seed}: resuming after {len(rows)} finished trainings")
    done = {(r["regime"], r["filter"], r["budget"]) for r in rows}
    for regime in args.regimes:
        for name, budget, mask in sets.values():
            if (regime, name, budget) in done:
                continue
            t1 = time.perf_counter()
            model, tk = retrain(
                train_d.images, train_d.captions, mask, model=base, regime=regime, config=cfg
            )
            m = evaluate(
                model, tk, test_d.images, test_d.captions,
                classes=classes, labels=labels, template=template,
            )  # fmt: skip
            rows.append(
                {
                    "seed": seed,
                    "regime": regime,
                    "filter": name,
                    "budget": budget,
                    "kept": int(mask.sum()),
                    "noisy_kept": int((mask & noisy).sum()),
                    **m,
                    "train_s": time.perf_counter() - t1,
                }
            )
            if args.csv:  # a long seed's finished trainings survive an interrupted run
                pd.DataFrame(rows).to_csv(partial_path(args.csv, seed), index=False)
        log(f"seed {seed}: {regime} done ({len(sets)} trainings)")
    return rows, det


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    ap.add_argument("--n", type=int, default=3000, help="training pairs")
    ap.add_argument("--noise", type=float, default=0.3, help="true noise rate of the training set")
    ap.add_argument("--n-val", type=int, default=300, help="clean validation pairs (for ecif)")
    ap.add_argument("--n-test", type=int, default=1000, help="clean held-out test pairs")
    ap.add_argument("--seeds", type=int, default=5, help="how many paired seeds")
    ap.add_argument(
        "--seed-start",
        type=int,
        default=0,
        help="first seed (seeds are seed-start .. seed-start+seeds-1), to split a run over "
        "processes or machines; join the CSVs with --report",
    )
    ap.add_argument("--regimes", nargs="+", default=["finetune", "scratch"])
    ap.add_argument(
        "--detect-only",
        action="store_true",
        help="no training: every filter's detection AP per seed (minutes, not hours); with "
        "--csv NAME.csv, only NAME.detect.csv is written",
    )
    ap.add_argument(
        "--probes",
        type=float,
        default=None,
        help="the head mode's probe fraction (default: ecif's, 0.1); 0 is the default that "
        "the recorded trainings used (before the probe weighting)",
    )
    ap.add_argument("--steps", type=int, default=1500, help="training steps per kept set")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: 5e-4 fine-tune, 2e-3 scratch)",
    )
    ap.add_argument(
        "--primary",
        default="zero_shot_acc",
        choices=["zero_shot_acc", "i2t_r@1", "t2i_r@1", "i2t_r@5", "t2i_r@5"],
        help="the metric of the verdict, the gap closed and the figure",
    )
    ap.add_argument("--model", default="ecif-tiny", help="pretrained base: ecif-tiny or a folder")
    ap.add_argument(
        "--device",
        default="cpu",
        help="where the CLIPs are trained: cpu (repeatable bit for bit), cuda or auto; "
        "the filters' scores are computed on the CPU either way",
    )
    ap.add_argument(
        "--model-modes",
        nargs="*",
        default=["projection"],
        choices=["projection", "lora"],
        help="ecif's model modes to add as filters (influence through the encoders' own "
        "parameters, fit on feature caches); none: the head mode alone",
    )
    ap.add_argument("--out", help="write the markdown report here too")
    ap.add_argument(
        "--csv",
        help="write the raw per-run rows here (after every seed, so a killed run keeps its "
        "finished seeds); the detection APs go beside it, to NAME.detect.csv",
    )
    ap.add_argument(
        "--report",
        nargs="+",
        metavar="CSV",
        help="no training: join the CSVs of earlier runs (and their .detect.csv) into one "
        "report, with this run's --primary/--out/--figure",
    )
    ap.add_argument("--figure", help="write an SVG figure here")
    ap.add_argument("--quick", action="store_true", help="smoke run: small n, few steps, 2 seeds")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.n_val, args.n_test, args.seeds, args.steps = 400, 100, 200, 2, 30
    return args


def detect_path(csv: str | Path) -> Path:
    """Where the detection APs of the run whose rows are in ``csv`` are kept."""
    csv = Path(csv)
    return csv.with_name(csv.stem + ".detect.csv")


def partial_path(csv: str | Path, seed: int) -> Path:
    """The trainings of ``seed`` finished so far (not read by ``--report``)."""
    csv = Path(csv)
    return csv.with_name(f"{csv.stem}.seed{seed}.partial.csv")


def joined(paths: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows and detection APs of split runs; a seed run twice is an error, not a mean."""
    runs = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    det = pd.concat([pd.read_csv(detect_path(p)) for p in paths], ignore_index=True)
    twice = runs.duplicated(["seed", "regime", "filter", "budget"])
    if twice.any():
        raise SystemExit(f"seed(s) {sorted(set(runs.loc[twice, 'seed']))} appear in two CSVs")
    # a seed split by regime (--regimes) scores its filters once per CSV: the same APs
    det = det.drop_duplicates(["seed", "filter", "ap"])
    if det.duplicated(["seed", "filter"]).any():
        raise SystemExit("one seed's detection APs differ between CSVs: not the same data")
    return runs.sort_values("seed", kind="stable"), det.sort_values("seed", kind="stable")


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    if args.report:
        runs, det = joined(args.report)
        args.seeds = runs["seed"].nunique()
        seconds = float(runs["train_s"].sum())
    else:
        rows, det_rows = [], []
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            r, d = one_seed(args, seed, args.model, log)
            rows += r
            det_rows += d
            if args.csv:  # every finished seed is kept, whatever happens to the next one
                if not args.detect_only:
                    pd.DataFrame(rows).to_csv(args.csv, index=False)
                pd.DataFrame(det_rows).to_csv(detect_path(args.csv), index=False)
        runs, det = pd.DataFrame(rows), pd.DataFrame(det_rows)
        seconds = time.perf_counter() - t0
    text = report(runs, det, vars(args), seconds)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.figure:
        Path(args.figure).write_text(svg_figure(runs, args.primary))
    return text


if __name__ == "__main__":
    main()
