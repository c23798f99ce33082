"""The filters curators already use, as scores that grow with suspicion (pure numpy).

ecif is judged against these, so they live beside it rather than in a benchmark:
``clip_score`` (DataComp-style: low cosine = suspect), ``neg_clip_loss`` (the cosine minus a
batch normaliser that discounts generic pairs, arXiv 2405.19547), ``loss_mixture`` (the
noisy-correspondence practice: a two-component mixture on per-pair loss), ``lemon`` (the
CLIP distance plus multimodal nearest-neighbour consensus, LEMoN, ICML 2025) and random.
"""

from __future__ import annotations

import numpy as np

from ecif.audit.metrics import two_gaussian_mixture
from ecif.data.neighbours import nearest_in, nearest_rows, neighbour_index

# neighbours the LEMoN-style consensus reads on each side (the planted near-miss probes are
# drawn from beyond them: ``selection._nearest_other_caption``)
CONSENSUS_K = 10


def _unit(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def cosine(x, y, chunk: int = 65536) -> np.ndarray:
    """Cosine of each pair's image and text embeddings (the pretrained model's score)."""
    out = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), chunk):
        out[s : s + chunk] = (_unit(x[s : s + chunk]) * _unit(y[s : s + chunk])).sum(1)
    return out


def neg_clip_loss(
    x, y, logit_scale: float = 100.0, batch: int = 1024, repeats: int = 5, seed: int = 0
) -> np.ndarray:
    """negCLIPLoss suspicion: -(cos_ii - tau/2 [logsumexp_j S_ij + logsumexp_j S_ji]) with
    S = cos / tau, averaged over ``repeats`` random batches. A pair close to everything
    (generic text, boilerplate) gets a large normaliser and so a low quality."""
    x, y = _unit(x), _unit(y)
    n, tau = len(x), 1.0 / logit_scale
    rng = np.random.default_rng(seed)
    norm = np.zeros(n)
    for _ in range(repeats):
        order = rng.permutation(n)
        for s in range(0, n, batch):
            b = order[s : s + batch]
            logits = (x[b] @ y[b].T).astype(np.float64) / tau
            norm[b] += 0.5 * tau * (_logsumexp(logits, 1) + _logsumexp(logits, 0))
    quality = cosine(x, y) - norm / repeats
    return -quality


def loss_mixture(pair_loss: np.ndarray) -> np.ndarray:
    """Posterior of the high-loss component of a two-Gaussian mixture on per-pair loss."""
    fit = two_gaussian_mixture(pair_loss)
    return fit.posterior_upper(np.asarray(pair_loss, dtype=np.float64))


def lemon(
    x,
    y,
    k: int = CONSENSUS_K,
    beta: float = 1.0,
    gamma: float = 1.0,
    temp: float = 5.0,
    device: str = "cpu",
    progress: bool = False,
    kind: str = "auto",
) -> np.ndarray:
    """LEMoN-style suspicion: cosine distance of the pair, plus how far its caption is from the
    captions of its image's k nearest images, plus how far its image is from the images of
    its caption's k nearest captions (each neighbour weighted by exp(-temp * its distance)).
    The neighbours come from a FAISS index (``ecif.data.neighbours``, ``kind``): exact below
    50,000 pairs, IVF above."""
    near = KnnConsensus(x, y, k=k, temp=temp, device=device, kind=kind, progress=progress)
    return near.of_rows(beta, gamma)


def lemon_queries(
    x_ref,
    y_ref,
    qx,
    qy,
    k: int = CONSENSUS_K,
    temp: float = 5.0,
    device: str = "cpu",
    kind: str = "auto",
) -> np.ndarray:
    """``lemon`` of query pairs (``qx``, ``qy``) that are not in the reference set: each
    query's neighbours are the k nearest reference images (captions), as a new pair added to
    that set would see them (beta = gamma = 1, as ``lemon``'s defaults)."""
    return KnnConsensus(x_ref, y_ref, k=k, temp=temp, device=device, kind=kind).of_queries(qx, qy)


class KnnConsensus:
    """A set's two FAISS indexes (images, captions) for the LEMoN-style consensus, built once:
    the set's own pairs (``of_rows``, what ``lemon`` returns) and pairs added to it
    (``of_queries``: a sampled twin's probes) read the same ones. At a million pairs each
    build trains an IVF quantizer, so a second build is minutes. The embeddings are read where
    they are (normalised a block at a time), not copied."""

    def __init__(
        self,
        x,
        y,
        *,
        k: int = CONSENSUS_K,
        temp: float = 5.0,
        device: str = "cpu",
        kind: str = "auto",
        progress: bool = False,
    ) -> None:
        self.x, self.y, self.k, self.temp = np.asarray(x), np.asarray(y), int(k), float(temp)
        self.images = neighbour_index(self.x, kind, device, progress)
        self.captions = neighbour_index(self.y, kind, device, progress)

    def of_rows(self, beta: float = 1.0, gamma: float = 1.0) -> np.ndarray:
        """Each pair's consensus over the other pairs of the set (its own row left out)."""
        x, y, k, t = self.x, self.y, self.k, self.temp
        s_img = _weighted_distance(*nearest_rows(x, k, index=self.images), y, y, t)
        s_txt = _weighted_distance(*nearest_rows(y, k, index=self.captions), x, x, t)
        return 1.0 - cosine(x, y) + beta * s_img + gamma * s_txt

    def of_queries(self, qx, qy) -> np.ndarray:
        """The consensus of pairs that are not in the set, over all of its pairs."""
        qx, qy, k = np.asarray(qx), np.asarray(qy), self.k
        img = nearest_in(self.x, qx, k, index=self.images)
        txt = nearest_in(self.y, qy, k, index=self.captions)
        return (
            1.0
            - cosine(qx, qy)
            + _weighted_distance(*img, qy, self.y, self.temp)
            + _weighted_distance(*txt, qx, self.x, self.temp)
        )


def _weighted_distance(
    sims: np.ndarray,
    nn: np.ndarray,
    b_query: np.ndarray,
    b_ref: np.ndarray,
    temp: float,
    chunk: int = 4096,
) -> np.ndarray:
    """Per query i: the mean of (1 - cos(b_query_i, b_ref_j)) over its neighbours j (``nn``,
    -1 = none), each weighted by exp(-temp (1 - its cosine ``sims``)). Rows of ``b_query``
    and ``b_ref`` need not be unit: each block is normalised as it is read."""
    w = np.where(nn >= 0, np.exp(-temp * (1.0 - sims.astype(np.float64))), 0.0)
    out = np.empty(len(b_query))
    for s in range(0, len(b_query), chunk):
        rows = slice(s, s + chunk)
        near = _unit(b_ref[np.maximum(nn[rows], 0)].reshape(-1, b_ref.shape[1]))
        near = near.reshape(*nn[rows].shape, -1)
        d_b = 1.0 - np.einsum("id,ikd->ik", _unit(b_query[rows]), near)
        out[rows] = (w[rows] * d_b).sum(1) / np.maximum(w[rows].sum(1), 1e-12)
    return out


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)
