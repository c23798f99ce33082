"""Misalignment detection with DEFAULT options, across noise kinds and embedding geometries.

    python benchmarks/bench_detect.py                        # the full grid, 3 seeds
    python benchmarks/bench_detect.py --geometries digits --kinds mixed --seeds 1   # one cell
    python benchmarks/bench_detect.py --quick                # 1 seed, n=800: a smoke run

Geometries: ``shapes`` (the tiny CLIP on the shapes it was trained on: the pretrained
similarity is strong), ``digits`` (the tiny CLIP on scikit-learn digits it never saw),
``clip_like`` (synthetic concept embeddings, matched cosine ~0.3, unmatched ~0.14) and
``aligned`` (synthetic, an encoder that knows the domain: matched ~0.7); held out of every
choice of the defaults, ``cone`` and ``weak`` (``ecif.data.concepts``) and ``latent_clip``,
``latent_aligned`` and ``latent_cone`` (a continuous latent with no classes, where each kind
plants its latent analogue: ``ecif.data.latent``). Noise kinds:
shuffle, confusable (near-miss class), attribute (one attribute wrong), boilerplate, mixed
(``ecif.data.noisy``, in the captions); with ``--kinds``, also placeholder images,
out-of-domain images or captions, and half-right captions, planted in the embeddings
(``embedding_noise.py``). Images and captions are embedded in memory with the tiny CLIP (the
same model and preprocessing as ``ecif embed``, without the JPEG round trip).

For every cell: ``ecif.Auditor(train, val).run()`` with default options, its
``misalign_score`` and its single signals, against the baselines a curator already has:
clip_score, negCLIPLoss, per-pair loss + GMM, LEMoN-style kNN consensus, TracIn (identity
Hessian on the same head), random; plus the default without its probe weighting (the
mixture alone, ``probes=0``) and the pre-selection default (logit scale of the model,
lam 1e-3, influence alone). Two ceilings no user has: the default's signals (five with a
validation set, the last being the LEMoN-style consensus; four without), and the same with
negCLIPLoss and LEMoN, weighted by a logistic regression on the planted labels
(cross-fitted in halves): where the first is below a baseline, no weighting of the audit's
signals wins that cell. AP, AUROC, precision at the true noise count, and the automatic
threshold's flagged/true ratio. ``--no-val`` audits without the validation set, as a user
with no trusted pairs does (no trusted_loss, no TracIn then). Prints markdown tables: mean
and [min, max] over seeds.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import pandas as pd
import torch
from embedding_noise import EMBEDDING_KINDS, corrupt_embeddings

import ecif
from ecif.audit.baselines import cosine, lemon, loss_mixture, neg_clip_loss
from ecif.audit.combine import CONSENSUS, Standardiser, fit_mixture
from ecif.audit.metrics import ranking_metrics
from ecif.audit.misalign import signal_suspicions
from ecif.audit.probe_regression import probe_direction
from ecif.data.concepts import HELD_OUT
from ecif.data.latent import LATENT_GEOMETRIES, latent_pairs
from ecif.engine.influence import loss_gradient, score_pass

GEOMETRIES = ("shapes", "digits", "clip_like", "aligned")  # the grid the defaults were chosen on
KINDS = ("shuffle", "confusable", "attribute", "boilerplate", "mixed")


@functools.lru_cache(1)
def tiny_model():
    from ecif.data.models import load_model
    from ecif.data.tiny_clip import tiny_clip

    return load_model(f"local-dir:{tiny_clip()}", device="cpu")


@torch.no_grad()
def embed_in_memory(data) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and caption embeddings of a ShapesData-like set with the tiny CLIP."""
    from ecif.data.tiny_clip import images_to_tensor

    lm = tiny_model()
    imgs = images_to_tensor(data.images, lm.image_size)
    x = torch.cat(
        [lm.model.encode_image(imgs[s : s + 512], normalize=True) for s in range(0, len(imgs), 512)]
    )
    caps = data.frame["caption"].to_numpy()
    uniq, inv = np.unique(caps, return_inverse=True)
    t = torch.cat(
        [
            lm.model.encode_text(lm.tokenizer(list(uniq[s : s + 512])), normalize=True)
            for s in range(0, len(uniq), 512)
        ]
    )
    return x.numpy().astype(np.float32), t.numpy()[inv].astype(np.float32)


def make_sets(
    geometry: str,
    kind: str,
    noise: float,
    seed: int,
    n: int,
    n_val: int,
    d: int,
    class_skew: float = 0.0,
    captions_per_image: int = 1,
    val_noise: float = 0.0,
):
    """(train EmbeddingSet with captions, validation EmbeddingSet (``metadata["is_corrupted"]``:
    its planted rows), is_corrupted);
    ``class_skew``: long-tailed classes in both sets; ``captions_per_image``: k captions of
    one image, as COCO's five, in both sets (both: synthetic geometries only); ``val_noise``:
    the validation set's own share of corrupted captions, of the same kind (0: clean)."""
    if kind in EMBEDDING_KINDS:  # a clean set, then its embeddings corrupted
        if val_noise:
            raise SystemExit("--val-noise: caption noise kinds only")
        train, val, _ = make_sets(
            geometry, "shuffle", 0.0, seed, n, n_val, d, class_skew, captions_per_image
        )
        x, y, labels = corrupt_embeddings(train.image, train.text, kind, noise, seed)
        out = ecif.EmbeddingSet(
            x, y, ids=train.ids, metadata=train.metadata, logit_scale=train.logit_scale
        )
        return out, val, labels
    if geometry in LATENT_GEOMETRIES:  # no classes, no caption text: the kinds' latent analogues
        if class_skew or captions_per_image > 1:
            raise SystemExit("--class-skew and --captions-per-image: concept geometries only")
        x, y, labels = latent_pairs(geometry, kind, noise, seed, n, d)
        xv, yv, val_labels = latent_pairs(geometry, kind, val_noise, seed + 10_000, n_val, d)
        keys = np.array([f"latent-{seed}-{i:06d}" for i in range(n)])
        train = ecif.EmbeddingSet(x, y, ids=keys, logit_scale=100.0)
        planted = pd.DataFrame({"is_corrupted": val_labels})
        return train, ecif.EmbeddingSet(xv, yv, metadata=planted, logit_scale=100.0), labels
    if geometry in ("shapes", "digits"):
        if class_skew or captions_per_image > 1:
            raise SystemExit("--class-skew and --captions-per-image: synthetic geometries only")
        gen = ecif.datasets.shapes if geometry == "shapes" else ecif.datasets.digits
        train_data = gen(n, seed=seed, noise=noise, noise_kind=kind)
        val_data = gen(n_val, seed=seed + 10_000, noise=val_noise, noise_kind=kind)
        (x, y), (xv, yv) = embed_in_memory(train_data), embed_in_memory(val_data)
        frame, vframe, scale = train_data.frame, val_data.frame, tiny_model().logit_scale
    else:
        shape = dict(
            geometry=geometry, class_skew=class_skew, captions_per_image=captions_per_image
        )
        x, y, frame = ecif.datasets.concept_pairs(n, d, noise, kind, seed=seed, **shape)
        xv, yv, vframe = ecif.datasets.concept_pairs(
            n_val, d, val_noise, kind, seed=seed + 10_000, **shape
        )
        scale = 100.0
    meta = pd.DataFrame({"caption": frame["caption"].to_numpy()})
    train = ecif.EmbeddingSet(x, y, ids=frame["key"].to_numpy(), metadata=meta, logit_scale=scale)
    planted = pd.DataFrame({"is_corrupted": vframe["is_corrupted"].to_numpy()})
    val = ecif.EmbeddingSet(xv, yv, metadata=planted, logit_scale=scale)
    return train, val, frame["is_corrupted"].to_numpy()


def labelled_ceiling(features: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """The best linear weighting of ``features`` for the planted labels, cross-fitted: the
    audit's own regression (``probe_direction``, its L2 penalty: without one, separable
    cells diverge; weights of either sign: a ceiling is not bounded) fit on one half with the true labels scores the other. No user has these
    labels; the ceiling says whether a cell is lost by the weighting of the signals or by the
    signals."""
    fold = np.random.default_rng(seed).permutation(len(labels)) % 2
    out = np.empty(len(labels))
    for k in (0, 1):
        w, _ = probe_direction(features[fold != k], labels[fold != k], nonnegative=False)
        out[fold == k] = features[fold == k] @ w
    return out


def tracin(head, train, val) -> np.ndarray:
    """TracIn with an identity Hessian on the audit's head: -(g_val . g_pair)."""
    g = loss_gradient(head, val.image, val.text)
    d_pos, d_neg = score_pass(head, train.image, train.text, g)
    return -(d_pos + d_neg)


def one_cell(geometry: str, kind: str, seed: int, args) -> list[dict]:
    train, val, labels = make_sets(
        geometry,
        kind,
        args.noise,
        seed,
        args.n,
        args.n_val,
        args.d,
        args.class_skew,
        args.captions_per_image,
        args.val_noise,
    )
    val = None if args.no_val else val  # no trusted pairs: self-influence or cross-fitting
    t0 = time.perf_counter()
    aud = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed))
    table = aud.run()
    seconds = time.perf_counter() - t0
    head = aud.heads[0]
    alone = ecif.Auditor(train, val, ecif.AuditArgs(seed=seed, probes=0.0)).run()
    old = ecif.Auditor(
        train, val, ecif.AuditArgs(seed=seed, logit_scale="model", lam=1e-3, weights="influence")
    )
    x, y = np.asarray(train.image), np.asarray(train.text)
    loss = table["pair_loss"].to_numpy(np.float64)
    rng = np.random.default_rng(seed)
    neg_clip = neg_clip_loss(x, y, logit_scale=train.logit_scale or 100.0, seed=seed)
    lemon_score = lemon(x, y)
    # the default's own features (robust z, tails Gaussianised), as its mixture sees them
    # (its influence slot holds self-influence when the audit had no validation set)
    sus = signal_suspicions(table, head.n_norm)
    own = fit_mixture(sus).features(sus)
    # LEMoN is among the default's own signals with a validation set (knn_disagreement)
    outside = (neg_clip,) if CONSENSUS in table else (neg_clip, lemon_score)
    extra = np.column_stack([Standardiser.of(v)(v) for v in outside])
    rankings = {
        "ecif misalign_score (default)": table["misalign_score"].to_numpy(),
        "  its influence alone": sus["influence"],
        "  its pair_loss alone": table["pair_loss"].to_numpy(),
        "  its trusted_loss alone": table["trusted_loss"].to_numpy() if val is not None else None,
        "  its mixture alone (probes=0)": alone["misalign_score"].to_numpy(),
        "ecif before selection (t model, lam 1e-3)": old.run()["misalign_score"].to_numpy(),
        "clip_score": -cosine(x, y),
        "negCLIPLoss": neg_clip,
        # the mixture's posterior saturates at 0 and 1: the loss itself breaks its ties
        "per-pair loss + GMM": loss_mixture(loss)
        + 1e-9 * (loss - loss.min()) / max(np.ptp(loss), 1e-12),
        "LEMoN-style": lemon_score,
        "TracIn (identity H)": None if val is None else tracin(head, train, val),
        "random": rng.random(len(train)),
        CEILING: labelled_ceiling(own, labels, seed),
        CEILING_PLUS: labelled_ceiling(np.hstack([own, extra]), labels, seed),
    }
    rows = [
        {
            "geometry": geometry,
            "kind": kind,
            "seed": seed,
            "method": k,
            **ranking_metrics(labels, v),
        }
        for k, v in rankings.items()
        if v is not None
    ]
    choice = aud.choice
    rows.append(
        {
            "geometry": geometry,
            "kind": kind,
            "seed": seed,
            "method": "auto threshold: flagged / true",
            "auroc": float(table["is_misaligned"].sum() / max(1, labels.sum())),
            "ap": np.nan,
            "p@k": float(labels[table["is_misaligned"].to_numpy()].mean())
            if table["is_misaligned"].any()
            else np.nan,
            "choice": f"t={choice.logit_scale:.3g} lam={choice.lam:g}",
            "reliable": "UNRELIABLE" not in table.attrs["threshold"],
            "seconds": seconds,
        }
    )
    return rows


def summarise(df: pd.DataFrame, keys: list[str], cols: list[str]) -> pd.DataFrame:
    g = df.groupby(keys, sort=False)[cols]
    mean, lo, hi = g.mean(), g.min(), g.max()
    out = mean.copy().astype(object)
    for c in cols:
        out[c] = [f"{m:.3f} [{a:.3f}, {b:.3f}]" for m, a, b in zip(mean[c], lo[c], hi[c])]
    return out.reset_index()


def markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


CEILING = "ceiling: its signals, labelled weights"
CEILING_PLUS = "ceiling: + negCLIPLoss, LEMoN"


def _span(v: pd.Series) -> str:
    return f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]"


def verdict(det: pd.DataFrame) -> pd.DataFrame:
    """Per cell: the default's mean AP against the best baseline's, and whether every seed's
    difference has one sign (a win or loss outside the seed spread)."""
    base = [
        "clip_score",
        "negCLIPLoss",
        "per-pair loss + GMM",
        "LEMoN-style",
        "TracIn (identity H)",  # not without a validation set
    ]
    out = []
    for (geo, kind), cell in det.groupby(["geometry", "kind"], sort=False):
        ap = cell.pivot_table(index="seed", columns="method", values="ap")
        base = [b for b in base if b in ap]
        best = ap[base].mean().idxmax()
        diff = ap["ecif misalign_score (default)"] - ap[best]
        sign = "win" if (diff > 0).all() else "loss" if (diff < 0).all() else "within noise"
        out.append(
            {
                "geometry": geo,
                "kind": kind,
                "default AP": f"{ap['ecif misalign_score (default)'].mean():.3f}",
                "best baseline": best,
                "its AP": f"{ap[best].mean():.3f}",
                "difference [min, max]": f"{diff.mean():+.3f} [{diff.min():+.3f}, {diff.max():+.3f}]",
                "verdict": sign,
                "ceiling (its signals) [min, max]": _span(ap[CEILING]),
                "ceiling (+2 baselines)": _span(ap[CEILING_PLUS]),
            }
        )
    return pd.DataFrame(out)


def paired(det: pd.DataFrame, a: str, b: str) -> str:
    """Mean AP of methods ``a`` and ``b`` over all cell-seeds, and their difference per seed
    with a 95% t-interval over seeds (the seeds are the independent repeats)."""
    ap = det.pivot_table(index=["geometry", "kind", "seed"], columns="method", values="ap")
    per_seed = (ap[a] - ap[b]).groupby(level="seed").mean().to_numpy()
    m, half = per_seed.mean(), np.nan
    if len(per_seed) > 1:
        from scipy.stats import t

        half = t.ppf(0.975, len(per_seed) - 1) * per_seed.std(ddof=1) / np.sqrt(len(per_seed))
    seeds = ", ".join(f"{v:+.4f}" for v in per_seed)
    return (
        f"mean AP over {len(ap)} cell-seeds: {a.strip()} {ap[a].mean():.4f}, {b.strip()} "
        f"{ap[b].mean():.4f}; difference per seed {seeds}, 95% interval "
        f"[{m - half:+.4f}, {m + half:+.4f}]"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--geometries",
        nargs="+",
        default=list(GEOMETRIES),
        choices=GEOMETRIES + HELD_OUT + tuple(LATENT_GEOMETRIES),
        help="default: the four the defaults were chosen on; held out of every choice: "
        + ", ".join(HELD_OUT + tuple(LATENT_GEOMETRIES))
        + " (the latent_ ones: a continuous latent, no classes; ecif.data.latent)",
    )
    ap.add_argument(
        "--kinds",
        nargs="+",
        default=list(KINDS),
        choices=KINDS + EMBEDDING_KINDS,
        help="caption noise (default) or, in the embeddings, " + ", ".join(EMBEDDING_KINDS),
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--first-seed", type=int, default=0, help="seeds run from this one (more seeds later)"
    )
    ap.add_argument("--n", type=int, default=2000, help="training pairs per cell")
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--d", type=int, default=64, help="width of the synthetic geometries")
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument(
        "--class-skew",
        type=float,
        default=0.0,
        help="long-tailed classes (synthetic geometries): class of rank r drawn with "
        "probability ~ r^-skew, in training and validation sets (0: uniform)",
    )
    ap.add_argument(
        "--captions-per-image",
        type=int,
        default=1,
        help="synthetic geometries: each image is this many rows, one caption each (COCO: 5)",
    )
    ap.add_argument(
        "--no-val",
        action="store_true",
        help="audit without the validation set (the audit's default then: self-influence for "
        "small heads, else cross-fitting); no trusted_loss, no TracIn",
    )
    ap.add_argument(
        "--val-noise",
        type=float,
        default=0.0,
        help="the validation set's own share of corrupted captions, of the cell's kind (a "
        "user who splits their noisy data in two); default 0: clean",
    )
    ap.add_argument("--quick", action="store_true", help="1 seed, n=800, n_val=300")
    ap.add_argument("--csv", help="also write every row to this CSV")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.n, args.n_val = 1, 800, 300
    torch.manual_seed(0)
    t0 = time.time()
    rows = []
    for geometry in args.geometries:
        for kind in args.kinds:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                rows += one_cell(geometry, kind, seed, args)
                print(f"done {geometry} {kind} seed={seed} ({time.time() - t0:.0f} s)", flush=True)
    df = pd.DataFrame(rows)
    if args.csv:
        df.to_csv(args.csv, index=False)
    det = df[df["method"] != "auto threshold: flagged / true"]
    print("\n## Average precision (mean [min, max] over seeds)\n")
    print(markdown(summarise(det, ["geometry", "kind", "method"], ["ap", "auroc", "p@k"])))
    print("\n## The default against the best baseline, per cell\n")
    print(markdown(verdict(det)))
    print("\n" + paired(det, "ecif misalign_score (default)", "  its mixture alone (probes=0)"))
    thr = df[df["method"] == "auto threshold: flagged / true"]
    print("\n## Automatic threshold and the chosen head\n")
    print(
        markdown(
            thr[["geometry", "kind", "seed", "auroc", "p@k", "reliable", "choice", "seconds"]]
            .rename(columns={"auroc": "flagged/true", "p@k": "precision of flags"})
            .round(3)
        )
    )
    print(
        f"\n{args.seeds} seeds, n={args.n}, noise={args.noise}, class skew {args.class_skew}, "
        f"{args.captions_per_image} caption(s) an image, "
        f"{'no validation set' if args.no_val else f'n_val={args.n_val} (noise {args.val_noise})'}, {len(args.geometries)} geometries x "
        f"{len(args.kinds)} kinds, {time.time() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
