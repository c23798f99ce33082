"""Two guards for sets whose captions repeat (classification sets captioned by their labels):
planted probes never carry their row's own caption, and the threshold's count is checked
against the count the final score's own two groups imply. Checked on known score
distributions, by brute force over the planted rows, and on a real audit of a two-class set
without validation pairs, where the rule before flagged 1.6x the planted label flips."""

import warnings

import numpy as np
import pytest

import ecif
from ecif.audit.baselines import CONSENSUS_K
from ecif.audit.selection import SAME, make_probes, probe_sources
from ecif.audit.thresholds import (
    FALLBACK_FRACTION,
    SCORE_AGREEMENT,
    NoiseRate,
    checked_by_score,
    flag_count,
)
from ecif.data.concepts import class_caption_pairs


def _two_groups(seed: int, n: int = 4000, noise: float = 0.2):
    g = np.random.default_rng(seed)
    bad = g.random(n) < noise
    return np.where(bad, g.normal(5.0, 1.0, n), g.normal(0.0, 1.0, n)), bad


@pytest.mark.parametrize("seed", range(3))
def test_a_count_over_the_final_scores_own_is_not_trusted(seed):
    score, bad = _two_groups(seed)
    over = checked_by_score(NoiseRate(0.37, True, "", 0.35, 0.21), score)
    assert not over.reliable and "final score's own two groups" in over.why
    assert over.score_rate == pytest.approx(bad.mean(), abs=0.02)  # the fit counts the truth
    # the fallback flags as many as score like the shuffled probes (0.21), not the 37%
    count, how = flag_count(score, "auto", NoiseRate(0.37, True, "", 0.35, 0.21))
    assert count == round(0.21 * len(score)) and "UNRELIABLE" in how
    # a count within SCORE_AGREEMENT of it stands, and says so
    near = checked_by_score(NoiseRate(0.25, True), score)
    assert near.reliable and near.rate == 0.25 and 0.25 <= SCORE_AGREEMENT * near.score_rate
    assert flag_count(score, "auto", NoiseRate(0.25, True))[0] == round(0.25 * len(score))


def test_the_check_leaves_counts_it_cannot_read_alone():
    most, _ = _two_groups(0, noise=0.7)  # a fit the scores cannot support (over 50%)
    assert checked_by_score(NoiseRate(0.4, True), most) == NoiseRate(0.4, True)
    untrusted = NoiseRate(0.4, False, "no separate group of suspects")
    assert checked_by_score(untrusted, _two_groups(0)[0]) is untrusted
    assert flag_count(most, "auto", untrusted)[0] == round(FALLBACK_FRACTION * 4000)


def _repeated_captions(seed: int, n: int = 600, captions: int = 2):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    texts = g.standard_normal((captions, 16))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return x.astype(np.float32), texts[g.integers(0, captions, n)].astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_planted_captions_are_never_the_rows_own(seed):
    x, y = _repeated_captions(seed)  # two captions: half of the shuffled partners share one
    src, text_src, kind = probe_sources(x, y, 0.2, seed)
    for rows in (kind == "shuffle", kind == "near"):
        own = np.einsum("ij,ij->i", y[src[rows]], y[text_src[rows]])
        assert (own < SAME).all()  # brute force: each planted caption differs
    shuffle = src[kind == "shuffle"]
    rolled = np.roll(shuffle, 1)
    keep = np.einsum("ij,ij->i", y[shuffle], y[rolled]) < SAME
    # a partner whose caption differs is kept: sets without repeats plant what they did
    assert (text_src[kind == "shuffle"][keep] == rolled[keep]).all() and not keep.all()
    px, py, pk = make_probes(x, y, 0.2, seed)  # the embeddings: the same planted rows
    for rows in (pk == "shuffle", pk == "near"):
        own = py[rows] @ y.T  # the probe's caption against every caption of its image's row
        rows_of = [np.flatnonzero((x == p).all(1))[0] for p in px[rows]]
        assert (own[np.arange(len(rows_of)), rows_of] < SAME).all()


@pytest.mark.parametrize("seed", range(2))
def test_no_probe_takes_another_caption_of_its_own_picture(seed):
    g = np.random.default_rng(seed)
    pictures = g.standard_normal((120, 16)).astype(np.float32)
    x = np.repeat(pictures / np.linalg.norm(pictures, axis=1, keepdims=True), 5, axis=0)
    y = g.standard_normal((600, 16)).astype(np.float32)  # five captions a picture, as COCO's
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    src, text_src, kind = probe_sources(x, y, 0.2, seed)
    assert len(src) == 120 and (kind == "near").sum() == 60  # none dropped: others exist
    picture = np.arange(600) // 5
    assert (picture[src] != picture[text_src]).all()  # each planted caption: another picture's
    # near: the caption of the first other picture's row beyond the consensus's neighbours
    for i, j in zip(src[kind == "near"], text_src[kind == "near"]):
        other = np.flatnonzero(picture != picture[i])
        ranked = np.sort(x[other] @ x[i])[::-1]  # by brute force, nearest first
        assert x[j] @ x[i] == pytest.approx(ranked[CONSENSUS_K], abs=1e-6)


@pytest.mark.parametrize("seed", range(2))
def test_a_near_probe_caption_is_not_among_the_neighbours_the_consensus_reads(seed):
    g = np.random.default_rng(seed)
    x = g.standard_normal((400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x + 0.3 * g.standard_normal((400, 16)).astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    src, text_src, kind = probe_sources(x, y, 0.2, seed)
    near = kind == "near"
    assert near.sum() == 40
    for i, j in zip(src[near], text_src[near]):
        # the probe's image is row i's: the consensus reads its nearest rows (row i's own
        # copy among them); the row its caption came from must lie beyond them
        order = np.argsort(-(x @ x[i]))
        assert j not in order[: CONSENSUS_K + 1]
        assert j in order[: 3 * CONSENSUS_K]  # still a near picture


def test_a_caption_no_other_differs_from_plants_no_probe():
    x, y = _repeated_captions(0, captions=1)  # one caption for every image
    src, text_src, kind = probe_sources(x, y, 0.2, 0)
    assert len(src) == 0  # every shuffled and nearest caption would be the row's own
    px, py, pk = make_probes(x, y, 0.2, 0)
    assert set(pk) == {"generic"} and len(px) == 40  # the generic third is planted still
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = ecif.Auditor(ecif.EmbeddingSet(x, y, logit_scale=100.0)).run()
    assert len(table) == len(x) and table["is_misaligned"].sum() > 0


def test_two_class_label_flips_without_validation_pairs_flag_about_the_planted_count():
    x, y, frame = class_caption_pairs(2000, classes=2, noise=0.2, seed=0)
    flipped = frame["is_corrupted"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = ecif.Auditor(ecif.EmbeddingSet(x, y, logit_scale=100.0)).run()
    flagged = table["is_misaligned"].to_numpy()
    # the rule before trusted the suspect mixture's 32% here (1.6x; precision 0.62)
    assert 0.8 <= flagged.sum() / flipped.sum() <= 1.3
    assert flipped[flagged].mean() > 0.75
