"""Digits pairs written as img2dataset-style shards, as a new user would embed them."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("sklearn")

import ecif  # noqa: E402


def test_digits_to_parquet_keeps_images_captions_and_ground_truth(tmp_path):
    d = ecif.datasets.digits(30, seed=1, noise=0.2)
    paths = d.to_parquet(tmp_path, shard_size=20, image_format="png")
    assert [p.name for p in paths] == ["00000.parquet", "00001.parquet"]
    t = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    assert t["caption"].tolist() == d.captions
    assert t["is_corrupted"].tolist() == d.frame["is_corrupted"].tolist()
    assert t["digit"].tolist() == d.frame["digit"].tolist()  # the attributes digits have
    assert "shape" not in t.columns  # and none of the shapes' it has not
    img = np.asarray(Image.open(io.BytesIO(t["png"][25])))
    assert np.array_equal(img, d.images[25])


def test_shapes_shards_keep_their_columns(tmp_path):
    d = ecif.datasets.shapes(5, seed=0, noise=0.4)
    t = pd.read_parquet(d.to_parquet(tmp_path)[0])
    want = ["key", "caption", "url", "status", "error_message", "width", "height", "sha256"]
    want += ["jpg", "true_caption", "is_corrupted", "corrupted_attribute"]
    want += ["shape", "colour", "size", "position", "background"]
    assert t.columns.tolist() == want
