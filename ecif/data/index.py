"""FAISS indexes over training embeddings, for the nearest-neighbour step of trace-back.

Inner product on L2-normalised vectors (cosine, CLIP's retrieval score). ``kind="auto"``
picks an exact flat index below ``IVF_MIN_ROWS`` rows and an IVF index above (nlist ~
4 sqrt(N), k-means trained on a sample), because a flat scan of millions of rows per query
is the slow part of trace-back at scale. Vectors are added in chunks straight from
(memory-mapped) arrays, so building needs memory for the index, not for a float32 copy.

Saved as ``<side>.faiss`` (faiss.write_index, always a CPU index) plus ``<side>.json``
(kind, n, d, side, nlist, nprobe); a GPU copy is made at load when asked and available.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecif.atomic import atomic_path, write_json
from ecif.device import DEFAULT_DEVICE, resolve_device

IVF_MIN_ROWS = 200_000
KINDS = ("auto", "flat", "ivf")
SIDES = ("image", "text")


class FaissIndexError(ValueError):
    """An index that cannot be built, loaded or searched; the message says why."""


DEFAULT_NPROBE = 32  # IVF lists searched per query unless asked otherwise


@dataclass
class IndexInfo:
    """What an index is, stored beside it as JSON."""

    kind: str
    n: int
    d: int
    side: str
    nlist: int = 0
    nprobe: int = 0
    metric: str = "inner_product"
    normalized: bool = True


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise FaissIndexError("faiss is not installed: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _wants_gpu(device: str) -> bool:
    """cuda asked for, or auto on a machine with CUDA (an index falls back to the CPU)."""
    return (resolve_device(device) if device == "auto" else device).startswith("cuda")


def _normalized(block: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(block, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


class VectorIndex:
    """A FAISS inner-product index over one side (image or text) of a training set.

    Row positions in search results are positions in the training set (0..n-1).
    """

    def __init__(self, index: Any, info: IndexInfo):
        self.index = index
        self.info = info
        self._gpu = False

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(
        cls,
        vectors: Any,
        *,
        side: str = "image",
        kind: str = "auto",
        nlist: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        device: str = DEFAULT_DEVICE,
        chunk: int = 65536,
        train_rows: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> VectorIndex:
        """Index the rows of ``vectors`` (N, d), read ``chunk`` rows at a time.

        ``nlist`` (IVF lists) defaults to 4 sqrt(N); the quantizer is trained on
        ``train_rows`` sampled rows (default 64 per list, at most 256k).
        """
        faiss = _faiss()
        if kind not in KINDS:
            raise FaissIndexError(f"index kind must be one of {KINDS}; got {kind!r}")
        if side not in SIDES:
            raise FaissIndexError(f"side must be one of {SIDES}; got {side!r}")
        n, d = int(vectors.shape[0]), int(vectors.shape[1])
        if n == 0:
            raise FaissIndexError("cannot index an empty set")
        if kind == "auto":
            kind = "flat" if n < IVF_MIN_ROWS else "ivf"
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
            nlist, nprobe = 0, 0
        else:
            nlist = int(nlist or max(1, round(4 * math.sqrt(n))))
            nlist = min(nlist, n)
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            m = min(n, train_rows or min(256 * 1024, 64 * nlist))
            rows = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
            sample = np.concatenate(
                [_normalized(vectors[rows[s : s + chunk]]) for s in range(0, m, chunk)]
            )
            index.train(sample)
            index.nprobe = min(nprobe, nlist)
        info = IndexInfo(kind=kind, n=n, d=d, side=side, nlist=nlist, nprobe=index_nprobe(index))
        out = cls(index, info)
        if _wants_gpu(device) and gpu_available():
            out.to_gpu()
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"index {side}", unit="row", disable=not progress)
        for s in range(0, n, chunk):
            block = _normalized(np.asarray(vectors[s : s + chunk]))
            out.index.add(block)
            bar.update(len(block))
        bar.close()
        return out

    def to_gpu(self) -> VectorIndex:
        """Move the index onto the first GPU (no-op without faiss GPU support)."""
        if self._gpu or not gpu_available():
            return self
        faiss = _faiss()
        self._res = faiss.StandardGpuResources()
        self.index = faiss.index_cpu_to_gpu(self._res, 0, self.index)
        self._gpu = True
        return self

    def set_nprobe(self, nprobe: int) -> None:
        """IVF lists visited per query: more is slower and closer to exact."""
        if self.info.kind == "ivf":
            self.index.nprobe = min(int(nprobe), self.info.nlist)
            self.info.nprobe = int(self.index.nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by cosine for each query: (scores, rows), each (q, k'), k' = min(k, n).

        Rows that IVF could not fill are dropped only when all queries miss them (-1 kept
        otherwise; callers filter ``rows >= 0``).
        """
        q = np.atleast_2d(np.asarray(queries))
        if q.shape[1] != self.info.d:
            raise FaissIndexError(
                f"query width {q.shape[1]} differs from the {self.info.side} index width "
                f"{self.info.d}: embed the query with the same model"
            )
        k = max(1, min(int(k), self.n))
        scores, rows = self.index.search(_normalized(q), k)
        return scores, rows.astype(np.int64)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``<side>.faiss`` and ``<side>.json`` into ``folder`` (atomically)."""
        faiss = _faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cpu = faiss.index_gpu_to_cpu(self.index) if self._gpu else self.index
        path = folder / f"{self.info.side}.faiss"
        with atomic_path(path) as tmp:
            faiss.write_index(cpu, str(tmp))
        write_json(folder / f"{self.info.side}.json", asdict(self.info))
        return path

    @classmethod
    def load(
        cls, folder: str | os.PathLike, side: str, *, device: str = DEFAULT_DEVICE
    ) -> VectorIndex:
        """Read an index written by ``save``; onto the GPU when ``device`` resolves to cuda
        and faiss has GPU support."""
        faiss = _faiss()
        folder = Path(folder)
        path, meta = folder / f"{side}.faiss", folder / f"{side}.json"
        if not path.exists() or not meta.exists():
            raise FaissIndexError(
                f"{folder}: no {side} index ({path.name}); run `ecif index` first"
            )
        try:
            info = IndexInfo(**json.loads(meta.read_text()))
            index = faiss.read_index(str(path))
        except (RuntimeError, TypeError, ValueError):  # faiss's reader raises RuntimeError
            raise FaissIndexError(
                f"{path}: cannot be read as a FAISS index (cut off or replaced); run `ecif "
                "index` again"
            ) from None
        out = cls(index, info)
        if out.n != info.n:
            raise FaissIndexError(f"{path}: holds {out.n} rows but {meta.name} says {info.n}")
        if info.kind == "ivf" and index_nprobe(out.index) < 1:  # older `ecif index --nprobe 0`
            out.set_nprobe(DEFAULT_NPROBE)  # faiss refuses to search with none
        if _wants_gpu(device):
            out.to_gpu()
        return out


def index_nprobe(index: Any) -> int:
    return int(getattr(index, "nprobe", 0))


def build_indexes(
    image: Any, text: Any, folder: str | os.PathLike | None = None, **kw: Any
) -> dict[str, VectorIndex]:
    """Image-side and text-side indexes of a training set; saved into ``folder`` if given."""
    out = {
        "image": VectorIndex.build(image, side="image", **kw),
        "text": VectorIndex.build(text, side="text", **kw),
    }
    if folder is not None:
        for idx in out.values():
            idx.save(folder)
    return out


def load_indexes(
    folder: str | os.PathLike, *, device: str = DEFAULT_DEVICE
) -> dict[str, VectorIndex]:
    """Both sides' indexes from ``folder``."""
    return {side: VectorIndex.load(folder, side, device=device) for side in SIDES}
