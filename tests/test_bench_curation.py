"""benchmarks/bench_curation.py end to end at toy size (so the script cannot rot), and its
report's arithmetic on hand-made runs."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_curation  # noqa: E402
from curation_report import regime_table, t_interval, verdict  # noqa: E402


def test_bench_curation_runs_end_to_end(tmp_path, tiny_clip_dir):
    argv = [
        "--dataset", "digits", "--n", "60", "--noise", "0.25", "--n-val", "30", "--n-test", "30",
        "--seeds", "2", "--steps", "2", "--batch-size", "16", "--model", str(tiny_clip_dir),
        "--out", str(tmp_path / "r.md"), "--csv", str(tmp_path / "r.csv"),
        "--figure", str(tmp_path / "r.svg"),
    ]  # fmt: skip
    text = bench_curation.main(argv)
    runs = pd.read_csv(tmp_path / "r.csv")
    n_sets = 2 + 2 * (len(bench_curation.FILTERS) + 1)  # none, oracle, filters + projection
    assert len(runs) == 2 * 2 * n_sets  # seeds x regimes x kept sets
    noisy = 15  # 25% of 60
    oracle = runs[runs["filter"] == "oracle"]
    assert (oracle["kept"] == 60 - noisy).all() and (oracle["noisy_kept"] == 0).all()
    assert (runs.loc[runs["budget"] == "1x", "kept"] == 60 - noisy).all()
    assert (runs.loc[runs["budget"] == "2x", "kept"] == 60 - 2 * noisy).all()
    assert runs["zero_shot_acc"].between(0, 1).all() and runs["t2i_r@5"].between(0, 1).all()
    assert "### finetune" in text and "### scratch" in text and "ecif (head) @1x" in text
    assert "ecif (projection) @2x" in text
    assert (tmp_path / "r.md").read_text() == text
    assert (tmp_path / "r.svg").read_text().startswith("<svg")


def test_report_arithmetic():
    rows = []
    for seed, (none, oracle, ecif, clip) in enumerate([(0.4, 0.8, 0.6, 0.5), (0.5, 0.9, 0.8, 0.5)]):
        for f, b, acc in (("none", "0", none), ("oracle", "noisy", oracle),
                          ("ecif (head)", "1x", ecif), ("clip_score", "1x", clip)):  # fmt: skip
            rows.append({"seed": seed, "filter": f, "budget": b, "kept": 10, "noisy_kept": 1,
                         "zero_shot_acc": acc, "i2t_r@1": acc, "t2i_r@1": acc,
                         "i2t_r@5": acc, "t2i_r@5": acc})  # fmt: skip
    table, raw = regime_table(pd.DataFrame(rows))
    # gap: oracle 0.85 - none 0.45 = 0.4; ecif 0.7 - 0.45 = 0.25 -> 62.5%; clip 0.05 -> 12.5%
    closed = raw.set_index("filter")["closed"]
    assert closed["ecif (head)"] == pytest.approx(0.625) and closed["clip_score"] == pytest.approx(
        0.125
    )
    assert table.set_index("filter").loc["ecif (head) @1x", "gap closed"] == "62%"
    m, lo, hi = t_interval([0.2, 0.3])  # sd (ddof 1) 0.05 * sqrt(2); t(0.975, 1) = 12.706
    assert m == pytest.approx(0.25) and hi - m == pytest.approx(
        12.706 * (0.05 * np.sqrt(2)) / np.sqrt(2), rel=1e-3
    )
    said = verdict(pd.DataFrame(rows))
    assert len(said) == 1 and "Goal (best and >= 50%): met" in said[0]
    # paired difference ecif - clip_score per seed: 0.1, 0.3 -> mean 0.2, t(0.975, 1) interval
    assert "paired difference 0.200 [" in said[0] and "within noise" in said[0]
    _, raw_r5 = regime_table(pd.DataFrame(rows).assign(**{"i2t_r@5": 0.5}), "i2t_r@5")
    assert raw_r5["closed"].isna().all()  # no gap: the oracle equals no filtering


def test_split_seeds_join_to_the_same_report(tmp_path, tiny_clip_dir):
    """Seeds 0 and 1 run in two processes and joined by --report give the one-run report."""
    common = [
        "--dataset", "shapes", "--n", "40", "--noise", "0.25", "--n-val", "20", "--n-test", "20",
        "--steps", "2", "--batch-size", "16", "--model", str(tiny_clip_dir),
        "--regimes", "finetune",
    ]  # fmt: skip
    whole = bench_curation.main([*common, "--seeds", "2", "--csv", str(tmp_path / "w.csv")])
    for start in (0, 1):
        bench_curation.main(
            [
                *common,
                "--seeds",
                "1",
                "--seed-start",
                str(start),
                "--csv",
                str(tmp_path / f"{start}.csv"),
            ]
        )
    assert set(pd.read_csv(tmp_path / "1.csv")["seed"]) == {1}
    assert set(pd.read_csv(tmp_path / "1.detect.csv")["seed"]) == {1}
    parts = [str(tmp_path / "0.csv"), str(tmp_path / "1.csv")]
    joined = bench_curation.main([*common, "--report", *parts])

    def body(text):  # everything but the timing line
        return [ln for ln in text.splitlines() if not ln.startswith(("Wall time", "Training time"))]

    assert body(joined) == body(whole)
    with pytest.raises(SystemExit, match="two CSVs"):
        bench_curation.main([*common, "--report", parts[0], str(tmp_path / "w.csv")])


def test_detect_only_scores_without_training_and_probes_reach_the_head_mode(
    tmp_path, tiny_clip_dir
):
    """--detect-only: the filters' APs and no training; --probes 0 changes only ecif's AP, to
    the AP (scikit-learn's) of an audit run here with probes=0 on the same embeddings."""
    from sklearn.metrics import average_precision_score

    import ecif

    common = [
        "--dataset", "digits", "--n", "400", "--noise", "0.25", "--n-val", "60",
        "--seeds", "1", "--model", str(tiny_clip_dir), "--detect-only", "--model-modes",
    ]  # fmt: skip
    text = bench_curation.main([*common, "--csv", str(tmp_path / "d.csv")])
    bench_curation.main([*common, "--probes", "0", "--csv", str(tmp_path / "p0.csv")])
    assert "### Detection" in text and "trained on the kept pairs" not in text
    assert not (tmp_path / "d.csv").exists()  # no trainings, no rows
    det = pd.read_csv(tmp_path / "d.detect.csv").set_index("filter")["ap"]
    det0 = pd.read_csv(tmp_path / "p0.detect.csv").set_index("filter")["ap"]
    assert det.drop("ecif (head)").equals(det0.drop("ecif (head)"))
    assert det["ecif (head)"] != det0["ecif (head)"]

    train_d = bench_curation.make_data("digits", 400, 0, 0.25)
    val_d = bench_curation.make_data("digits", 60, 10_000, 0.0)
    net, tok = bench_curation.create(str(tiny_clip_dir), "finetune")
    scale = float(net.logit_scale.detach().exp())
    train = bench_curation.embed_pairs(net, tok, train_d, scale)
    val = bench_curation.embed_pairs(net, tok, val_d, scale)
    table = ecif.Auditor(train, val, ecif.AuditArgs(seed=0, probes=0.0)).run()
    noisy = train_d.frame["is_corrupted"].to_numpy(bool)
    expect = average_precision_score(noisy, table["misalign_score"].to_numpy())
    assert det0["ecif (head)"] == pytest.approx(expect, abs=1e-9)
