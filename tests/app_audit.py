"""A small real audit folder for the app and notebook tests (shapes + a tiny CLIP, ~seconds)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def make_small_audit(
    out: Path, model_dir: Path, n_train: int = 240, n_val: int = 80, shard_size: int = 80
) -> Path:
    """What `ecif demo` writes, at test size and with the session's tiny model."""
    import ecif
    from ecif.audit.auditor import AuditArgs
    from ecif.audit.shards import score_shards

    train = ecif.datasets.shapes(n=n_train, seed=0, noise=0.2)
    val = ecif.datasets.shapes(n=n_val, seed=1000, noise=0.0)
    train.to_parquet(out / "data" / "train", shard_size=shard_size)
    val.to_parquet(out / "data" / "val", shard_size=shard_size)
    model = f"local-dir:{model_dir}"
    with contextlib.chdir(out):  # relative input paths, as a user types them: the app and
        for split in ("train", "val"):  # the tests then run from other working folders
            ecif.embed(f"data/{split}", f"embeddings/{split}", model=model, device="cpu")
    val_set = ecif.EmbeddingSet.load(out / "embeddings" / "val")
    args = AuditArgs(batch_size=64, seed=0)
    score_shards(out / "embeddings" / "train", out, val_set, args=args, log=lambda s: None)
    return out
