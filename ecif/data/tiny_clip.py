"""A tiny open_clip model trained from scratch on clean shapes, so demos and tests need no download.

The model is a registered open_clip config (``ecif-tiny``: ViT image tower on 64 px, 2-layer text
transformer, ~3.6 M parameters, most of them the token embedding of the stock CLIP tokenizer).
It is saved as an open_clip ``local-dir:`` folder (``open_clip_config.json`` + weights) under
the ecif cache, with a ``report.json`` of its held-out retrieval accuracy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecif.atomic import atomic_dir, write_text
from ecif.data.shapes import ShapesData, shapes
from ecif.paths import cache_dir  # noqa: F401  (also ecif.data.tiny_clip.cache_dir, as before)

log = logging.getLogger(__name__)

TINY_NAME = "ecif-tiny"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
_FORMAT_VERSION = 1


def tiny_config(
    embed_dim: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    vision_width: int = 64,
    vision_layers: int = 2,
    text_width: int = 64,
    text_layers: int = 2,
    context_length: int = 16,
) -> dict[str, Any]:
    """An open_clip model config (the dict form of a ``model_configs/*.json``)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": vision_layers,
            "width": vision_width,
            "head_width": 32,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": text_width,
            "heads": max(1, text_width // 32),
            "layers": text_layers,
        },
    }


def register_config(name: str = TINY_NAME, cfg: dict[str, Any] | None = None) -> str:
    """Register ``cfg`` with open_clip under ``name`` (a json file in the cache); returns name."""
    import open_clip

    cfg = cfg or tiny_config()
    folder = cache_dir() / "model_configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    text = json.dumps(cfg, indent=1, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        write_text(path, text)
    open_clip.add_model_config(path)
    return name


@dataclass
class TinyClipReport:
    """What training produced: where, how well, how long."""

    path: str
    accuracy: float  # held-out image->text top-1 among `candidates` captions
    chance: float  # expected accuracy of a random guess (accounts for duplicate captions)
    candidates: int
    n_eval: int
    n_train: int
    steps: int
    seconds: float  # wall clock
    cpu_seconds: float  # process CPU time (all threads), robust to a busy machine
    threads: int
    n_params: int
    config: dict[str, Any]


def images_to_tensor(images: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, size, size), as open_clip's preprocess
    does it (PIL bicubic resize, then normalise), so training sees what embedding will see."""
    from PIL import Image

    if size is not None and images.shape[1] != size:
        images = np.stack(
            [np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images]
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def retrieval_accuracy(
    model: torch.nn.Module, tokenizer: Any, data: ShapesData, candidates: int = 100
) -> tuple[float, float]:
    """Image->text top-1 within blocks of ``candidates`` pairs; a hit is the right caption text.

    Returns (accuracy, chance). Chance counts candidates whose caption equals the true one.
    """
    model.eval()
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    caps = data.frame["true_caption"].to_numpy()
    hits, chance, total = 0, 0.0, 0
    for start in range(0, len(data) - candidates + 1, candidates):
        sl = slice(start, start + candidates)
        u = model.encode_image(images_to_tensor(data.images[sl], size), normalize=True)
        v = model.encode_text(tokenizer(list(caps[sl])), normalize=True)
        pred = (u @ v.T).argmax(dim=1).numpy()
        block = caps[sl]
        hits += int((block[pred] == block).sum())
        chance += float(sum((block == c).sum() / candidates for c in block))
        total += candidates
    return hits / total, chance / total


def train_tiny_clip(
    out_dir: str | os.PathLike,
    *,
    cfg: dict[str, Any] | None = None,
    n_train: int = 6000,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    image_size: int = 64,
    n_eval: int = 1000,
    candidates: int = 100,
    threads: int | None = 1,
    progress: bool = False,
) -> TinyClipReport:
    """Train a tiny CLIP from scratch on clean shapes and save it as a ``local-dir:`` folder.

    Shapes are drawn at ``image_size`` (the dataset default) and resized to the model's input
    as open_clip's preprocess would. Train and held-out pairs come from different seeds.
    Deterministic for fixed arguments and thread count. ``threads``: torch threads while
    training; 1 by default: the model is too small for intra-op threads to pay (measured on
    the shared 2-core dev machine: 80 CPU-s with 1 thread, over 470 CPU-s with 2), None keeps
    torch's setting.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        args = (cfg, n_train, steps, batch_size, lr, seed, image_size, n_eval, candidates)
        return _train(out_dir, *args, progress)
    finally:
        torch.set_num_threads(old_threads)


def _train(out_dir, cfg, n_train, steps, batch_size, lr, seed, image_size, n_eval, candidates,
           progress) -> TinyClipReport:  # fmt: skip
    import open_clip

    cfg = cfg or tiny_config()
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    size = cfg["vision_cfg"]["image_size"]
    train = shapes(n_train, seed=10_000 + seed, image_size=image_size)
    held = shapes(n_eval, seed=20_000 + seed, image_size=image_size)
    x_all = images_to_tensor(train.images, size)
    t_all = tokenizer(train.frame["caption"].tolist())
    fit_contrastive(model, x_all, t_all, steps, batch_size, lr, seed, progress=progress)
    acc, chance = retrieval_accuracy(model, tokenizer, held, candidates)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    n_params = sum(p.numel() for p in model.parameters())
    out = Path(out_dir)
    report = TinyClipReport(
        str(out),
        acc,
        chance,
        candidates,
        n_eval,
        n_train,
        steps,
        seconds,
        cpu_seconds,
        torch.get_num_threads(),
        n_params,
        cfg,
    )
    save_local_dir(model, cfg, out, extra={"report": asdict(report)})
    log.info("tiny CLIP: held-out top-1 %.3f (chance %.3f) in %.0f s", acc, chance, seconds)
    return report


@torch.enable_grad()  # callers may sit under no_grad (embedding code that builds the model lazily)
def fit_contrastive(
    model: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    *,
    weight_decay: float = 0.05,
    progress: bool = False,
    desc: str = "training tiny CLIP",
) -> torch.nn.Module:
    """Train ``model`` in place with the symmetric CLIP loss; the one training loop of ecif.

    ``images``: preprocessed (N, 3, S, S); ``tokens``: (N, L). AdamW, linear warm-up over the
    first 5% of ``steps`` then cosine decay to 0; batches are drawn without replacement from a
    permutation seeded by ``seed`` (reshuffled when it runs out). The logit scale is clamped to
    [1, 100] after every step. Deterministic for fixed inputs, seed and thread count.
    """
    n = len(images)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)),
    )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc=desc, unit="step")
    model.train()
    for _ in bar:
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size].to(images.device)
        pos += batch_size
        u = model.encode_image(images[idx], normalize=True)
        v = model.encode_text(tokens[idx], normalize=True)
        logits = model.logit_scale.exp() * u @ v.T
        target = torch.arange(len(idx), device=logits.device)
        loss = 0.5 * (
            torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
    model.eval()
    return model


def save_local_dir(
    model: torch.nn.Module, cfg: dict[str, Any], out: Path, extra: dict | None = None
) -> Path:
    """Write an open_clip ``local-dir:`` folder atomically (temp folder + rename)."""
    from safetensors.torch import save_file

    out = Path(out)
    preprocess = {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic"}
    doc = {"model_cfg": cfg, "preprocess_cfg": preprocess}
    with atomic_dir(out) as tmp:
        (tmp / "open_clip_config.json").write_text(json.dumps(doc, indent=1))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        if extra:
            (tmp / "report.json").write_text(json.dumps(extra.get("report", extra), indent=1))
    return out


def tiny_clip(
    *, train_if_missing: bool = True, progress: bool = False, **train_kwargs: Any
) -> Path:
    """The cached tiny model folder (use as ``local-dir:<path>``), trained once if missing.

    Different training knobs get different cache entries.
    """
    key = {k: v for k, v in train_kwargs.items() if k != "threads"}  # threads: speed only
    key["v"] = _FORMAT_VERSION
    key["cfg"] = train_kwargs.get("cfg") or tiny_config()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "models" / f"{TINY_NAME}-{digest}"
    if (path / "open_clip_config.json").exists():
        return path
    if not train_if_missing:
        raise FileNotFoundError(f"no cached tiny model at {path}; call ecif.datasets.tiny_clip()")
    train_tiny_clip(path, progress=progress, **train_kwargs)
    return path


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """The training report saved next to a tiny model."""
    return json.loads((Path(path) / "report.json").read_text())
