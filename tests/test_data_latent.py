"""The continuous-latent pairs: the cosines each geometry promises, the planted share, each
noise kind moving the caption by its own amount, and seeds that reproduce."""

import numpy as np
import pytest

import ecif
from ecif.data.latent import KIND_ORDER


def _cosines(x, y):
    return (x * y).sum(1), (x[: len(x) // 2] @ y[len(x) // 2 :].T).mean()


@pytest.mark.parametrize(
    "geometry, matched, unmatched",
    [("latent_clip", 0.29, 0.12), ("latent_aligned", 0.72, 0.15), ("latent_cone", 0.63, 0.41)],
)
def test_each_geometry_has_the_cosines_it_promises(geometry, matched, unmatched):
    x, y, bad = ecif.datasets.latent_pairs(geometry, "shuffle", 0.0, 0, 2000)
    assert x.dtype == np.float32 and x.shape == (2000, 64) and not bad.any()
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    same, other = _cosines(x, y)
    assert same.mean() == pytest.approx(matched, abs=0.04)
    assert other == pytest.approx(unmatched, abs=0.04)


def test_the_kinds_move_captions_from_plainest_to_subtlest():
    drop = {}
    for kind in KIND_ORDER:
        x, y, bad = ecif.datasets.latent_pairs("latent_aligned", kind, 0.2, 1, 3000)
        assert bad.sum() == 600
        same = (x * y).sum(1)
        drop[kind] = same[~bad].mean() - same[bad].mean()
    # a fresh latent or a template is as far as an unmatched caption; a nearby latent, then
    # a sixth of the coordinates redrawn, are nearer
    assert drop["shuffle"] > drop["confusable"] > drop["attribute"] > 0.03
    assert drop["boilerplate"] > drop["confusable"]
    x, y, bad = ecif.datasets.latent_pairs("latent_aligned", "mixed", 0.2, 1, 3000)
    assert bad.sum() == 600


def test_seeds_reproduce_and_bad_names_fail():
    a = ecif.datasets.latent_pairs("latent_clip", "mixed", 0.1, 3, 500)
    b = ecif.datasets.latent_pairs("latent_clip", "mixed", 0.1, 3, 500)
    c = ecif.datasets.latent_pairs("latent_clip", "mixed", 0.1, 4, 500)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="geometry"):
        ecif.datasets.latent_pairs("latent", "shuffle", 0.1, 0, 10)
    with pytest.raises(ValueError, match="kind"):
        ecif.datasets.latent_pairs("latent_clip", "colour", 0.1, 0, 10)
