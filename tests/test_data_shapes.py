"""The synthetic shapes dataset: deterministic, honest ground truth, img2dataset-style shards."""

import io

import numpy as np
import pandas as pd
from PIL import Image

from ecif import datasets
from ecif.data.shapes import BACKGROUNDS, POSITIONS


def test_shapes_deterministic_from_seed():
    a = datasets.shapes(50, seed=3, noise=0.2)
    b = datasets.shapes(50, seed=3, noise=0.2)
    c = datasets.shapes(50, seed=4, noise=0.2)
    assert np.array_equal(a.images, b.images)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert not np.array_equal(a.images, c.images)


def test_noise_shuffles_exactly_that_fraction_and_marks_it():
    d = datasets.shapes(400, seed=0, noise=0.25)
    f = d.frame
    assert f["is_corrupted"].sum() == 100
    differs = f["caption"] != f["true_caption"]
    assert (differs == f["is_corrupted"]).all()
    # a shuffle, not new text: the corrupted captions are the corrupted rows' true captions
    bad = f[f["is_corrupted"]]
    assert sorted(bad["caption"]) == sorted(bad["true_caption"])
    assert datasets.shapes(400, seed=0, noise=0.0).frame["is_corrupted"].sum() == 0


def test_attribute_noise_changes_exactly_one_word():
    d = datasets.shapes(200, seed=1, noise=0.3, noise_kind="attribute")
    f = d.frame
    assert f["is_corrupted"].sum() == 60
    for r in f[f["is_corrupted"]].itertuples():
        a, b = r.caption.split(), r.true_caption.split()
        assert len(a) == len(b) or r.corrupted_attribute == "position"
        if r.corrupted_attribute != "position":
            assert sum(x != y for x, y in zip(a, b)) == 1, (r.caption, r.true_caption)
        true_value = getattr(r, r.corrupted_attribute)
        assert true_value not in r.caption  # the word for the true value is gone
        assert r.caption != r.true_caption
    assert (f.loc[~f["is_corrupted"], "caption"] == f.loc[~f["is_corrupted"], "true_caption"]).all()


def test_captions_name_the_attributes():
    f = datasets.shapes(30, seed=1).frame
    for r in f.itertuples():
        assert (
            r.caption == f"a {r.size} {r.colour} {r.shape} {r.position}, {r.background} background"
        )


def test_pixels_follow_position_and_background():
    """The shape's centre of mass lies towards the captioned side; the corner shows the bg."""
    d = datasets.shapes(120, seed=2, image_size=64)
    for img, r in zip(d.images, d.frame.itertuples()):
        bg = np.array(BACKGROUNDS[r.background], dtype=float)
        corner = img[:4, :4].reshape(-1, 3).mean(0)
        assert np.abs(corner - bg).max() < 45
        fg = np.abs(img.astype(float) - img[:4, :4].reshape(-1, 3).mean(0)).sum(-1) > 90
        ys, xs = np.nonzero(fg)
        cx, cy = POSITIONS[r.position]
        assert abs(xs.mean() / 64 - cx) < 0.12 and abs(ys.mean() / 64 - cy) < 0.12, r


def test_to_parquet_writes_img2dataset_shards(tmp_path):
    d = datasets.shapes(25, seed=5, noise=0.2)
    paths = d.to_parquet(tmp_path, shard_size=10, image_format="png")
    assert [p.name for p in paths] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    t = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    for col in ("key", "caption", "url", "status", "error_message", "width", "height", "sha256"):
        assert col in t.columns
    assert t["key"].tolist() == d.frame["key"].tolist()
    assert t["is_corrupted"].tolist() == d.frame["is_corrupted"].tolist()
    img = np.asarray(Image.open(io.BytesIO(t["png"].iloc[7])))
    assert np.array_equal(img, d.images[7])  # png is lossless
