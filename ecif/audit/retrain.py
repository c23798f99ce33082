"""Judge a filter the way curators do: train a CLIP on the pairs it keeps, test it on clean pairs.

``retrain`` (a) fine-tunes a pretrained open_clip model (the cached tiny CLIP by default) or
(b) trains the same architecture from scratch, on the kept pairs, with one training loop
(``ecif.data.tiny_clip.fit_contrastive``) and one config for every filter, so the only
difference between two runs is which pairs were kept. ``evaluate`` measures the model on a
clean held-out set: zero-shot classification with class prompts and image<->text recall@k.
Deterministic for a fixed seed (and thread count) on the CPU; ``RetrainConfig.device`` trains
on a GPU instead, repeatable there only up to the order of floating-point sums.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ecif.data.tiny_clip import fit_contrastive, images_to_tensor
from ecif.options import option

REGIMES = ("finetune", "scratch")
DEFAULT_LR = {"finetune": 5e-4, "scratch": 2e-3}


@dataclass
class RetrainConfig:
    """One training recipe, applied unchanged to every kept set."""

    steps: int = option(300, help="training steps per kept set")
    batch_size: int = option(64, help="pairs per training step")
    lr: float | None = option(
        None,
        help="learning rate; if not given: "
        + ", ".join(f"{v:g} {k.replace('finetune', 'fine-tune')}" for k, v in DEFAULT_LR.items()),
    )
    weight_decay: float = option(0.05, help="AdamW weight decay")
    seed: int = option(0, help="seed of the initialisation and the batches")
    threads: int | None = option(1, help="torch threads while training; None keeps torch's setting")
    device: str = option(
        "cpu",
        help="where to train and evaluate: cpu (bit-for-bit repeatable), cuda, or auto "
        "(cuda when present); GPU runs repeat only up to floating-point order",
    )

    def torch_device(self) -> str:
        """The device to train on; a clear error when a GPU is asked for and none is there."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"retraining device {self.device!r}: torch sees no CUDA device")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"retraining device must be cpu, cuda or auto; got {self.device!r}")
        return self.device

    def lr_for(self, regime: str) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[regime])


def model_spec(model: str | os.PathLike) -> str:
    """``ecif-tiny`` (the cached tiny CLIP), ``local-dir:PATH``, or a folder -> open_clip name."""
    model = str(model)
    if model == "ecif-tiny":
        from ecif.data.tiny_clip import tiny_clip

        return f"local-dir:{tiny_clip()}"
    if not model.startswith(("local-dir:", "hf-hub:")) and Path(model).is_dir():
        return f"local-dir:{Path(model).resolve()}"
    return model


def create(
    model: str | os.PathLike, regime: str = "finetune", seed: int = 0
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer): the pretrained weights (``finetune``) or a seeded random init of
    the same architecture (``scratch``), on the CPU, in float32."""
    import open_clip

    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}; got {regime!r}")
    spec = model_spec(model)
    torch.manual_seed(seed)
    quiet = logging.root.manager.disable
    if regime == "scratch":  # open_clip warns that no weights were loaded: that is the point
        logging.disable(logging.WARNING)
    try:
        net = open_clip.create_model(spec, load_weights=regime == "finetune", device="cpu")
    except (RuntimeError, OSError, ValueError) as e:  # no such config, folder or checkpoint
        from ecif.data.models import ModelLoadError

        raise ModelLoadError(
            f"cannot build the model to retrain, {model!r}: {str(e).split(' Available:')[0]} "
            "(give ecif-tiny, local-dir:FOLDER or an open_clip name)"
        ) from None
    finally:
        logging.disable(quiet)
    return net.float(), open_clip.get_tokenizer(spec)


def image_size(net: torch.nn.Module) -> int:
    size = net.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def retrain(
    images: np.ndarray,
    captions: Sequence[str],
    keep: np.ndarray | None = None,
    *,
    model: str | os.PathLike = "ecif-tiny",
    regime: str = "finetune",
    config: RetrainConfig | None = None,
    progress: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Train on the kept pairs; returns (model, tokenizer) in eval mode.

    ``images``: uint8 (N, H, W, 3) (resized to the model's input as open_clip's preprocess
    would); ``captions``: N strings; ``keep``: a boolean mask or row indices (None: all).
    """
    cfg = config or RetrainConfig()
    rows = _rows(keep, len(images))
    if len(rows) < 2:
        raise ValueError(f"need at least 2 kept pairs to train; got {len(rows)}")
    old = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        device = cfg.torch_device()
        net, tok = create(model, regime, cfg.seed)
        net = net.to(device)
        x = images_to_tensor(np.asarray(images)[rows], image_size(net)).to(device)
        t = tok([str(captions[i]) for i in rows]).to(device)
        fit_contrastive(
            net,
            x,
            t,
            cfg.steps,
            cfg.batch_size,
            cfg.lr_for(regime),
            cfg.seed,
            weight_decay=cfg.weight_decay,
            progress=progress,
            desc=f"retraining ({regime}, {len(rows)} pairs)",
        )
    finally:
        torch.set_num_threads(old)
    return net, tok


def _rows(keep, n: int) -> np.ndarray:
    if keep is None:
        return np.arange(n)
    keep = np.asarray(keep)
    if keep.dtype == bool:
        if len(keep) != n:
            raise ValueError(f"keep mask has {len(keep)} entries for {n} pairs")
        return np.nonzero(keep)[0]
    return np.sort(keep.astype(np.int64))


def labels_from_captions(captions: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """The class each caption names: the class name found in it as whole words (the longest
    when several are; -1 when none is, or when two different names of equal length are)."""
    pats = [re.compile(rf"(?<!\w){re.escape(c.lower())}(?!\w)") for c in classes]
    out = np.full(len(captions), -1, dtype=np.int64)
    for i, cap in enumerate(captions):
        hits = [j for j, p in enumerate(pats) if p.search(str(cap).lower())]
        if hits:
            best = max(len(classes[j]) for j in hits)
            top = [j for j in hits if len(classes[j]) == best]
            out[i] = top[0] if len(top) == 1 else -1
    return out


def _device_of(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def encode_images(net, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Unit image embeddings on the CPU, computed where ``net`` lives."""
    size, dev = image_size(net), _device_of(net)
    parts = [
        net.encode_image(images_to_tensor(images[s : s + batch], size).to(dev), normalize=True)
        for s in range(0, len(images), batch)
    ]
    return torch.cat(parts).float().cpu()


@torch.no_grad()
def encode_texts(net, tok, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
    """Unit text embeddings on the CPU, computed where ``net`` lives."""
    dev = _device_of(net)
    parts = [
        net.encode_text(tok(list(texts[s : s + batch])).to(dev), normalize=True)
        for s in range(0, len(texts), batch)
    ]
    return torch.cat(parts).float().cpu()


@torch.no_grad()
def class_prompts(
    net: torch.nn.Module, tokenizer: Any, classes: Sequence[str], template: str | Sequence[str]
) -> torch.Tensor:
    """One unit text embedding per class: ``template.format(name)``, or with several templates
    the normalised mean over them (CLIP's prompt ensembling)."""
    templates = [template] if isinstance(template, str) else list(template)
    texts = [t.format(c) for c in classes for t in templates]
    e = encode_texts(net, tokenizer, texts).view(len(classes), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(e, dim=-1)


@torch.no_grad()
def evaluate(
    net: torch.nn.Module,
    tokenizer: Any,
    images: np.ndarray,
    captions: Sequence[str],
    *,
    classes: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
    template: str | Sequence[str] = "a photo of a {}.",
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Zero-shot accuracy and recall@k of ``net`` on clean held-out pairs.

    Zero-shot: each image against one prompt per class (``template.format(name)``, or the
    ensemble of several templates, ``class_prompts``); its label
    is ``labels`` (indices into ``classes``, -1 = skip) or, without them, the class its caption
    names (``labels_from_captions``). Without ``classes``, the classes are the distinct
    captions, used as their own prompts, and each image's label is its caption.
    Recall@k: image->text over the distinct captions (the right text among the top k);
    text->image over all images (an image whose caption equals the query among the top k).
    """
    net.eval()
    captions = [str(c) for c in captions]
    n = len(captions)
    distinct, inverse = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    u = encode_images(net, np.asarray(images))
    v = encode_texts(net, tokenizer, list(distinct))
    out: dict[str, float] = {}
    # zero-shot
    if classes is None:
        prompts, lab = v, inverse
    else:
        lab = labels_from_captions(captions, classes) if labels is None else np.asarray(labels)
        prompts = class_prompts(net, tokenizer, classes, template)
    lab = np.asarray(lab)
    m = lab >= 0
    pred = (u[torch.as_tensor(m)] @ prompts.T).argmax(1).numpy()
    out["zero_shot_acc"] = float((pred == lab[m]).mean()) if m.any() else float("nan")
    out["zero_shot_n"] = int(m.sum())
    # image -> text over the distinct captions
    s_it = u @ v.T  # (n, distinct)
    true = torch.as_tensor(inverse)
    rank_i2t = (s_it > s_it[torch.arange(n), true][:, None]).sum(1)
    # text -> image: query each distinct caption; the best-ranked image carrying it
    s_ti = s_it.T  # (distinct, n)
    order = s_ti.argsort(dim=1, descending=True).numpy()
    first = np.empty(len(distinct), dtype=np.int64)
    for q in range(len(distinct)):
        first[q] = np.argmax(inverse[order[q]] == q)
    rank_t2i = first[inverse]  # per pair: the rank of the first image with its caption
    for k in ks:
        out[f"i2t_r@{k}"] = float((rank_i2t < k).double().mean())
        out[f"t2i_r@{k}"] = float((rank_t2i < k).mean())
    return out


def retrain_and_evaluate(
    images: np.ndarray,
    captions: Sequence[str],
    keeps: Mapping[str, np.ndarray | None],
    eval_images: np.ndarray,
    eval_captions: Sequence[str],
    *,
    model: str | os.PathLike = "ecif-tiny",
    regimes: Sequence[str] = ("finetune",),
    config: RetrainConfig | None = None,
    classes: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
    template: str | Sequence[str] = "a photo of a {}.",
    progress: bool = False,
) -> pd.DataFrame:
    """One row per (kept set, regime): the kept count and ``evaluate``'s metrics.

    Every kept set is trained with the same ``config`` (steps, batch size, learning rate,
    seed), so rows differ only in which pairs were kept.
    """
    cfg = config or RetrainConfig()
    rows = []
    for regime in regimes:
        for name, keep in keeps.items():
            net, tok = retrain(
                images, captions, keep, model=model, regime=regime, config=cfg, progress=progress
            )
            metrics = evaluate(
                net,
                tok,
                eval_images,
                eval_captions,
                classes=classes,
                labels=labels,
                template=template,
            )
            kept = len(_rows(keep, len(images)))
            rows.append({"kept_set": name, "regime": regime, "kept": kept, **metrics})
    df = pd.DataFrame(rows)
    df.attrs["config"] = asdict(cfg)
    return df


def compare_retraining(
    table: pd.DataFrame,
    embeddings: str | os.PathLike,
    val: str | os.PathLike,
    count: int | None = None,
    *,
    seed: int = 0,
    model: str | os.PathLike = "ecif-tiny",
    regimes: Sequence[str] = ("finetune",),
    config: RetrainConfig | None = None,
    classes: Sequence[str] | None = None,
    template: str | Sequence[str] = "a photo of a {}.",
    progress: bool = False,
) -> pd.DataFrame:
    """``ecif clean --retrain-model``: retrain on all pairs and on what each strategy of
    ``ecif.audit.clean.drop_choices`` keeps, then measure on the validation pairs.

    ``table``: the audit table in the order of the ok rows of ``embeddings`` (the training
    embedding folder); images are read back from the input shards both folders' manifests
    name. ``count`` defaults to the flagged count.
    """
    from ecif.audit.clean import drop_choices
    from ecif.data.pair_images import load_pair_images

    count = int(table["is_misaligned"].sum()) if count is None else int(count)
    choices = drop_choices(table, count, seed)
    net, _ = create(model, "finetune")
    size = image_size(net)
    ids, images, captions = load_pair_images(embeddings, size)
    if list(ids) != list(table["id"]):
        raise ValueError(
            f"{embeddings}: the images read back do not line up with the audit table "
            f"({len(ids)} rows vs {len(table)}); were the input shards changed?"
        )
    _, val_images, val_captions = load_pair_images(val, size)
    keeps: dict[str, np.ndarray | None] = {"none (all pairs)": None}
    for name, drop in choices.items():
        mask = np.ones(len(table), dtype=bool)
        mask[drop] = False
        keeps[f"drop {name}"] = mask
    cfg = config or RetrainConfig(seed=seed)
    out = retrain_and_evaluate(
        images,
        captions,
        keeps,
        val_images,
        val_captions,
        model=model,
        regimes=regimes,
        config=cfg,
        classes=classes,
        template=template,
        progress=progress,
    )
    out.insert(2, "dropped", len(table) - out["kept"])
    return out
