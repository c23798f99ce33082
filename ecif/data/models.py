"""Load an open_clip model for embedding: name + pretrained tag, a checkpoint file, or local-dir.

Every failure ends in ``ModelLoadError`` with a message that says what to do, notably when
a pretrained tag would need a download and the machine is offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecif.device import DeviceError, resolve_device

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "resolve_device"]


class ModelLoadError(RuntimeError):
    """The model could not be created or its weights could not be found."""


@dataclass
class LoadedModel:
    """An open_clip model ready to embed, with its preprocess and tokenizer."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    name: str
    pretrained: str | None
    device: str
    image_size: int
    dim_image: int
    dim_text: int
    logit_scale: float | None = None  # exp(model.logit_scale), the scale CLIP trained with


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
        "ECIF_OFFLINE", "0"
    ) not in ("", "0")


def load_model(
    model: str, pretrained: str | None = None, device: str = "auto", *, random_init: bool = False
) -> LoadedModel:
    """Create ``model`` on ``device`` in eval mode.

    ``model``: an open_clip name (``ViT-B-32``, or ``ecif-tiny`` once registered),
    ``local-dir:/path`` (open_clip_config.json + weights), or ``hf-hub:org/repo``.
    ``pretrained``: a tag (``laion2b_s34b_b79k``), a checkpoint file, or ``"auto"`` (the
    model's first listed tag; nothing for local-dir and the cached ``ecif-tiny``).
    A named model without ``pretrained`` is an error unless ``random_init`` (benchmarks), so
    random embeddings never pass for real ones.
    """
    import open_clip

    from ecif.data.tiny_clip import TINY_NAME, register_config

    try:
        device = resolve_device(device)
    except DeviceError as e:
        raise ModelLoadError(str(e)) from None
    if pretrained == "auto":  # the model's own weights: first listed tag, cached tiny, or folder
        tags = open_clip.list_pretrained_tags_by_model(model)
        pretrained = tags[0] if tags and not model.startswith(TINY_NAME) else None
    if model == TINY_NAME and not pretrained:
        from ecif.data.tiny_clip import tiny_clip

        try:  # the cached trained weights, not a random init
            model = f"local-dir:{tiny_clip(train_if_missing=False)}"
        except FileNotFoundError as e:
            raise ModelLoadError(
                f"{e}. Train it once with `python -c 'import ecif; ecif.datasets.tiny_clip()'`"
            ) from e
    elif model.startswith(TINY_NAME):
        register_config()
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").exists():
            raise ModelLoadError(
                f"local-dir: {folder} has no open_clip_config.json (expected an open_clip "
                "model folder: open_clip_config.json + open_clip_model.safetensors)"
            )
        model = f"local-dir:{folder}"
        pretrained = None
    elif not model.startswith("hf-hub:") and open_clip.get_model_config(model) is None:
        raise ModelLoadError(
            f"unknown open_clip model {model!r}; see open_clip.list_models(), or pass "
            "local-dir:/path/to/folder"
        )
    if not model.startswith(("local-dir:", "hf-hub:")) and not pretrained and not random_init:
        raise ModelLoadError(
            f"no weights for {model}: pass a pretrained tag (e.g. "
            f"{(open_clip.list_pretrained_tags_by_model(model) or ['...'])[0]}), a checkpoint "
            "file, or local-dir:/path; random weights only with random_init=True"
        )
    if pretrained and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
                raise ModelLoadError(f"checkpoint file not found: {pretrained}")
            raise ModelLoadError(
                f"{pretrained!r} is neither a checkpoint file nor a pretrained tag of {model}; "
                f"tags: {tags}"
            )
    try:
        # tags trained with QuickGELU (OpenAI's) need it, or the embeddings are subtly wrong
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
        net, _, preprocess = open_clip.create_model_and_transforms(
            model,
            pretrained=pretrained,
            device=device,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        )
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as e:
        if pretrained and not os.path.isfile(pretrained):
            hint = (
                "the machine is offline (HF_HUB_OFFLINE is set)"
                if _offline()
                else "the download failed"
            )
            raise ModelLoadError(
                f"could not get weights {model}/{pretrained}: {hint} and they are not in the "
                "local cache. Download them once on a connected machine, or pass a local "
                f"checkpoint file (--pretrained /path/model.safetensors) or local-dir:/path. "
                f"Cause: {type(e).__name__}: {e}"
            ) from e
        raise ModelLoadError(f"could not create open_clip model {model}: {e}") from e
    net.eval()
    size = net.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    with torch.no_grad():
        dummy = torch.zeros(1, 3, size, size, device=device)
        d_img = int(net.encode_image(dummy).shape[-1])
        d_txt = int(net.encode_text(tokenizer([""]).to(device)).shape[-1])
    scale = getattr(net, "logit_scale", None)
    scale = float(scale.detach().exp().reshape(-1)[0]) if isinstance(scale, torch.Tensor) else None
    return LoadedModel(
        net, preprocess, tokenizer, model, pretrained, device, size, d_img, d_txt, scale
    )
