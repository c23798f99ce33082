"""The lora mode end to end on the tiny CLIP: shards embedded with the lora feature cache,
`ecif score --params lora`, and the same numbers from the library."""

import json

import numpy as np
import pandas as pd
import pytest

import ecif
from ecif import datasets
from ecif.cli import main
from ecif.data.features import load_features
from ecif.engine.lora_part import LoraPart
from ecif.engine.model_mode import ModelArgs, fit_model, score_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_score_cli_in_lora_mode_matches_the_python_api(tmp_path, tiny_clip_dir, capsys):
    model = f"local-dir:{tiny_clip_dir}"
    for name, n, noise, seed in (("train", 40, 0.25, 0), ("val", 16, 0.0, 1)):
        datasets.shapes(n, seed=seed, noise=noise).to_parquet(tmp_path / f"{name}-shards")
        ecif.embed(tmp_path / f"{name}-shards", tmp_path / name, model=model,
                   cache_features="lora")  # fmt: skip
    audit = tmp_path / "audit"
    opts = ["--params", "lora", "--lora-rank", "2", "--batch-size", "20", "--lam", "1.0"]
    code = main(["score", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                 "-o", str(audit), *opts, "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    info = json.loads((audit / "audit.json").read_text())
    assert info["options"]["params"] == "lora" and info["options"]["lora_rank"] == 2
    assert info["fit"][0]["converged"]
    table = pd.concat(pd.read_parquet(p) for p in sorted((audit / "scores").glob("*.parquet")))
    assert {"influence", "influence_pos", "influence_neg", "misalign_score"} <= set(table)
    assert len(table) == 40 and np.isfinite(table["influence"]).all()
    # the same numbers from the library, with the options the audit recorded
    train, val = load_features(tmp_path / "train"), load_features(tmp_path / "val")
    scale = info["head_choice"]["calibrated_scale"]
    args = ModelArgs(params="lora", lora_rank=2, batch_size=20, lam=1.0, logit_scale=scale)
    fitted = fit_model(train, train.init, args)
    assert isinstance(fitted.part, LoraPart) and fitted.part.floors[0] > 0
    ref = score_model(fitted, train, val).set_index("id")["influence"]
    got = table.set_index("id")["influence"]
    np.testing.assert_allclose(got.loc[ref.index].to_numpy(), ref.to_numpy(), rtol=1e-3, atol=1e-7)
