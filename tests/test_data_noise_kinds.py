"""Planted noise kinds, the digits and concept datasets: each kind does what it says."""

import numpy as np
import pandas as pd
import pytest

from ecif.data.concepts import CLASSES, concept_pairs
from ecif.data.concepts import SPACE as CONCEPTS
from ecif.data.digits import CONFUSABLE, digits
from ecif.data.noisy import BOILERPLATE, NOISE_KINDS, plant_noise
from ecif.datasets import shapes


def _attrs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({c: rng.choice(v, n) for c, v in CONCEPTS.values.items()})


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_each_kind_marks_exactly_the_changed_captions(kind):
    attrs = _attrs()
    caps, bad, kinds = plant_noise(attrs, CONCEPTS, 0.2, kind, seed=3)
    cols = list(CONCEPTS.values)
    changed = (caps[cols] != attrs[cols]).any(axis=1).to_numpy() | (caps["boilerplate"] >= 0)
    assert np.array_equal(bad, changed.to_numpy() if hasattr(changed, "to_numpy") else changed)
    assert 0.15 * len(attrs) <= bad.sum() <= 0.2 * len(attrs)  # shuffles may hit an equal caption
    assert all(k is None for k in kinds[~bad]) and all(k is not None for k in kinds[bad])
    again = plant_noise(attrs, CONCEPTS, 0.2, kind, seed=3)
    pd.testing.assert_frame_equal(caps, again[0])


def test_kinds_change_what_they_claim():
    attrs = _attrs(400)
    cols = list(CONCEPTS.values)
    caps, bad, _ = plant_noise(attrs, CONCEPTS, 0.25, "confusable", seed=1)
    diff = caps[cols] != attrs[cols]
    assert (diff.loc[bad, "object"]).all() and not diff.loc[bad].drop(columns="object").any().any()
    for i in np.nonzero(bad)[0]:
        assert caps.at[i, "object"] in CONCEPTS.confusable[attrs.at[i, "object"]]
    caps, bad, _ = plant_noise(attrs, CONCEPTS, 0.25, "attribute", seed=1)
    diff = (caps[cols] != attrs[cols]).to_numpy()
    assert (diff[bad].sum(1) == 1).all() and not diff[bad, cols.index("object")].any()
    caps, bad, _ = plant_noise(attrs, CONCEPTS, 0.25, "boilerplate", seed=1)
    assert (caps.loc[bad, "boilerplate"] >= 0).all() and (caps.loc[~bad, "boilerplate"] == -1).all()
    _, _, kinds = plant_noise(attrs, CONCEPTS, 0.4, "mixed", seed=1)
    counts = pd.Series(kinds[kinds != None]).value_counts()  # noqa: E711
    assert set(counts.index) == {"shuffle", "confusable", "attribute", "boilerplate"}


def test_digits_are_deterministic_and_captioned():
    a, b = (
        digits(60, seed=2, noise=0.2, noise_kind="mixed"),
        digits(60, seed=2, noise=0.2, noise_kind="mixed"),
    )
    assert np.array_equal(a.images, b.images)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    f = a.frame
    assert a.images.shape == (60, 32, 32, 3)
    assert ((f["caption"] != f["true_caption"]) == f["is_corrupted"]).all()
    clean = f[~f["is_corrupted"]]
    for r in clean.itertuples():
        assert r.caption == f"a {r.size} {r.colour} digit {r.digit} on {r.background}"
    conf = digits(200, seed=0, noise=0.3, noise_kind="confusable").frame
    for r in conf[conf["is_corrupted"]].itertuples():
        named = r.caption.split(" digit ")[1].split(" on ")[0]
        assert named in CONFUSABLE[r.digit]


def test_shapes_new_kinds():
    f = shapes(200, seed=0, noise=0.2, noise_kind="boilerplate").frame
    assert set(f.loc[f["is_corrupted"], "caption"]) <= set(BOILERPLATE)
    assert f["is_corrupted"].sum() == 40


@pytest.mark.parametrize(
    ("geometry", "matched_range", "unmatched_range", "min_gap"),
    [
        ("clip_like", (0.25, 0.4), (0.08, 0.2), 0.1),
        ("aligned", (0.6, 0.8), (0.12, 0.25), 0.1),
        ("cone", (0.55, 0.75), (0.3, 0.45), 0.1),
        ("weak", (0.15, 0.25), (0.06, 0.14), 0.05),  # the encoder barely knows the domain
    ],
)
def test_concept_geometries_have_their_cosines(geometry, matched_range, unmatched_range, min_gap):
    x, y, f = concept_pairs(2000, 64, geometry=geometry, seed=0)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    matched = (x * y).sum(1).mean()
    unmatched = (x[:500] @ y[500:1000].T).mean()
    assert matched_range[0] < matched < matched_range[1]
    assert unmatched_range[0] < unmatched < unmatched_range[1]
    assert matched - unmatched > min_gap
    # the same world for another seed: the same concepts map to the same directions
    x2, y2, f2 = concept_pairs(2000, 64, geometry=geometry, seed=1)
    same = (f["object"].to_numpy()[:, None] == f2["object"].to_numpy()[None, :])[:300, :300]
    sim = x[:300] @ x2[:300].T
    assert sim[same].mean() > sim[~same].mean() + 0.1


def test_long_tailed_classes_follow_zipf_and_keep_the_rest():
    n, skew = 20_000, 1.0
    x, y, f = concept_pairs(n, 32, 0.2, "confusable", seed=3, class_skew=skew)
    counts = f["object"].value_counts()
    # the class of rank r is drawn with probability r^-skew / sum_k k^-skew (20 classes)
    expected = np.arange(1, 21, dtype=float) ** -skew
    expected = n * expected / expected.sum()
    observed = np.sort(counts.reindex(list(CLASSES), fill_value=0).to_numpy())[::-1]
    assert np.all(np.abs(observed - expected) < 5 * np.sqrt(expected) + 1)  # ~5 sd
    assert observed[0] > 15 * observed[-1]  # a real long tail: 1 / (1/20) = 20x expected
    # the other attributes stay uniform, and the noise is planted at its rate
    colours = f["colour"].value_counts(normalize=True)
    assert colours.max() - colours.min() < 0.02
    assert abs(f["is_corrupted"].mean() - 0.2) < 0.01
    # validation sets from the same world share the tail's ranking
    _, _, fv = concept_pairs(5000, 32, seed=10_003, class_skew=skew)
    top = counts.index[:3]
    assert fv["object"].value_counts().index[:3].isin(top).all()


def test_several_captions_per_image_share_one_image_row_each():
    n, k = 1003, 5
    x, y, f = concept_pairs(n, 32, 0.2, "mixed", seed=4, captions_per_image=k)
    assert x.shape == (n, 32) and len(f) == n
    groups = np.arange(n) // k
    for g in (0, 57, groups[-1]):  # k rows of one image (the last image: the 3 left over)
        rows = np.flatnonzero(groups == g)
        assert (x[rows] == x[rows[0]]).all() and len(np.unique(f["true_caption"][rows])) == 1
        assert len(np.unique(y[rows], axis=0)) == len(rows)  # each caption drawn on its own
    assert len(np.unique(x, axis=0)) == -(-n // k)
    assert abs(f["is_corrupted"].mean() - 0.2) < 0.02  # corrupted caption by caption
    # a caption that is not corrupted matches its image as well as with one caption each
    x1, y1, f1 = concept_pairs(n, 32, 0.2, "mixed", seed=4)
    ok, ok1 = ~f["is_corrupted"].to_numpy(), ~f1["is_corrupted"].to_numpy()
    assert abs((x * y).sum(1)[ok].mean() - (x1 * y1).sum(1)[ok1].mean()) < 0.03
    with pytest.raises(ValueError, match="captions_per_image"):
        concept_pairs(10, 8, captions_per_image=0)
