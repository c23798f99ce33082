"""What a rerun of ``ecif score`` into an existing audit folder may keep.

A finished shard is kept only when this run would write the same scores: the same input
shard, options, model and validation set, and the same training and validation CONTENT (a
fingerprint of the rows: a changed, added or reordered shard refits the head, so every
shard's scores change, not only its own). Score files that this run would not write (an
earlier audit of other inputs) are refused before the fit rather than ranked with this run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ecif.atomic import read_parquet_meta
from ecif.audit.audit_args import RENAMED_OPTIONS
from ecif.audit.checks import AuditInputError
from ecif.audit.folder import read_heads

# options that do not change a shard's scores: a rerun that differs only in them reuses it
NOT_IN_SCORES = ("threshold", "device")
_KEY_FIELDS = ("model", "pretrained", "validation", "validation_embeddings", "id_column")
# shards scored before a signal joined, or before fingerprints were recorded, are scored again
_KEY_FIELDS += ("signals", "fingerprint")


def reusable(old: dict, source: str, meta: dict) -> bool:
    """A finished shard from an earlier run holds the scores this run would write: same input
    shard, model, validation set, score options and rows (the threshold is applied after)."""

    def key(m: dict) -> str:
        opts = (m.get("options") or {}).items()  # older runs name some options differently
        opts = {RENAMED_OPTIONS.get(k, k): v for k, v in opts if k not in NOT_IN_SCORES}
        # as JSON, so tuples in this run's options equal the lists read back from a file
        return json.dumps([[m.get(f) for f in _KEY_FIELDS], opts], sort_keys=True, default=str)

    return old.get("source") == source and key(old) == key(meta)


def earlier_run(out: Path, parts: list, meta: dict, n: int) -> tuple[list, dict] | None:
    """([head], shard metadata) of a finished earlier run in ``out`` whose every shard this
    run would write unchanged (``reusable``, and one combination across them: its final pass
    completed), else None. Then the head, w and the twin audit need not run again."""
    olds = []
    for p in parts:
        f = out / "scores" / p.output_name
        if not f.exists():
            return None
        old = read_parquet_meta(f)
        if not reusable(old, p.source, meta) or "combination" not in old:
            return None
        olds.append(old)
    if len({json.dumps(o["combination"], sort_keys=True) for o in olds}) != 1:
        return None
    if not (out / "w.npy").exists() or not (out / "head.pt").exists():
        return None
    heads = [h for h in read_heads(out) if h.partition.n == n]
    return (heads[:1], olds[0]) if heads else None


def check_no_stale_scores(out: Path, names: list[str]) -> None:
    """Refuse an output folder whose scores/ holds files this run would not write: they would
    be ranked, flagged and exported with this run's (an earlier audit of other inputs)."""
    scores = out / "scores"
    if not scores.is_dir():
        return
    stale = sorted(f.name for f in scores.glob("*.parquet") if f.name not in set(names))
    if stale:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise AuditInputError(
            f"{scores} holds {len(stale)} score file(s) this run would not write ({shown}): "
            "an audit of other inputs. Write this audit to a new folder, or remove them"
        )


def output_names(sources: list[str], indexes: list[int]) -> list[str]:
    """One score file name per input shard: its stem, and the part number too where two
    inputs share a stem (two crawls that each have a 00000.tar would write one file)."""
    stems = [Path(s).stem or f"part_{k}" for s, k in zip(sources, indexes)]
    counts = pd.Series(stems).value_counts()
    return [
        f"{stem}.part{k}.parquet" if counts[stem] > 1 else f"{stem}.parquet"
        for stem, k in zip(stems, indexes)
    ]
