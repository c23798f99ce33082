"""Cross-fitting keeps an image's captions in one half: checked against a brute-force
grouping of the rows by their image bytes, and against the halves' own heads."""

import numpy as np
import pytest

import ecif
from ecif import api
from ecif.audit import AuditArgs
from ecif.data.duplicates import image_halves


def _brute_groups(image: np.ndarray) -> list[set[int]]:
    groups: dict[bytes, set[int]] = {}
    for i, row in enumerate(image):
        groups.setdefault(row.tobytes(), set()).add(i)
    return list(groups.values())


def test_one_caption_per_image_splits_rows_as_a_seeded_permutation():
    image = np.random.default_rng(0).standard_normal((301, 8)).astype(np.float32)
    halves = image_halves(image, seed=11)
    fold = np.random.default_rng(11).permutation(301) % 2
    for k in (0, 1):
        np.testing.assert_array_equal(halves[k], np.flatnonzero(fold == k))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_image_falls_in_one_half(seed):
    x, _, _ = ecif.datasets.concept_pairs(600, 16, seed=seed, captions_per_image=5)
    halves = image_halves(x, seed=seed)
    np.testing.assert_array_equal(np.sort(np.concatenate(halves)), np.arange(600))
    side = np.zeros(600, dtype=int)
    side[halves[1]] = 1
    groups = _brute_groups(x)
    assert len(groups) == 120
    assert all(len({side[i] for i in g}) == 1 for g in groups)
    assert all(abs(len(h) - 300) <= 60 for h in halves)


def test_a_few_images_holding_most_rows_fall_back_to_the_row_split():
    image = np.zeros((40, 4), dtype=np.float32)
    image[:2] = np.eye(4)[:2]  # two images of one row each, one image of 38 rows
    halves = image_halves(image, seed=5)
    fold = np.random.default_rng(5).permutation(40) % 2
    for k in (0, 1):
        np.testing.assert_array_equal(halves[k], np.flatnonzero(fold == k))


def test_a_cross_fit_audit_fits_each_half_on_whole_images():
    x, y, _ = ecif.datasets.concept_pairs(400, 16, 0.2, "mixed", seed=3, captions_per_image=5)
    train = ecif.EmbeddingSet(x, y)
    auditor = ecif.Auditor(train, args=AuditArgs(no_val="crossfit", seed=4, dtype="float64"))
    loss = auditor.run()["pair_loss"].to_numpy()
    halves = image_halves(x, seed=4)  # whole images: the test above, by brute force
    row_fold = np.random.default_rng(4).permutation(400) % 2  # the split by rows
    for k, head in enumerate(auditor.heads):
        # each half's head was fit on, and its losses taken over, that half's rows
        want = api.pair_losses(head, train.subset(halves[k]))
        np.testing.assert_allclose(loss[halves[k]], want, rtol=1e-6)
        assert not np.array_equal(halves[k], np.flatnonzero(row_fold == k))
