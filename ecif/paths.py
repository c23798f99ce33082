"""Where ecif keeps its cache (the tiny CLIP, built-in datasets, consolidated embeddings)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """ecif's cache: ``$ECIF_CACHE_DIR`` if set, else ``~/.cache/ecif``."""
    env = os.environ.get("ECIF_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ecif"
