"""benchmarks/bench_reasoning_kd.py: a tiny configuration run twice gives identical figures
(teacher included), per-seed figures do not depend on the seeds run beside them, and the
paired summary's arithmetic, and runs of other arms merged per seed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_reasoning_kd as B  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--teacher-steps", "4", "--warm-steps", "3", "--b-steps", "2", "--bs", "4"]
TINY += ["--n-test", "12", "--threads", "1"]


def test_tiny_run_twice_gives_identical_figures():
    args = B.parse(TINY + ["--seeds", "2"])
    first, second = B.run(args), B.run(args)
    assert first == second  # the digests make this a bit-for-bit check of every model
    for row in first["seeds"]:  # the arms trained different models (in so tiny a run every
        # validity is 0, so w = 1/2 throughout and the calibrated variants coincide)
        kd = ("plain_fkl", "own_step", "onpolicy_jsd")
        digests = {row["init"]["digest"]} | {row["arms"][a]["digest"] for a in kd}
        assert len(digests) == 4
    assert set(first["seeds"][0]["arms"]) == set(B.ARMS)
    for row in first["seeds"]:
        for fig in [row["init"], *row["arms"].values()]:
            assert 0.0 <= fig["acc"] <= 1.0 and 0.0 <= fig["valid"] <= 1.0
    alone = B.run(B.parse(TINY + ["--seed0", "1", "--seeds", "1", "--arms", "own_step"]))
    assert alone["teacher"] == first["teacher"]
    assert alone["seeds"][0]["arms"]["own_step"] == first["seeds"][1]["arms"]["own_step"]
    assert "own_step - plain_fkl" in B.report(first, args)


def test_answer_only_arms_run_and_reproduce():
    arms = ["--arms", "own_step_mc", "answer_sft", "--mc", "1", "--seeds", "1"]
    args = B.parse(TINY + arms)
    first = B.run(args)
    assert first == B.run(args)
    row = first["seeds"][0]
    assert row["arms"]["own_step_mc"]["digest"] != row["init"]["digest"]


def test_seeds_change_the_figures():
    """The reproducibility test above could pass on a run that ignores its seeds."""
    args = B.parse(TINY + ["--seeds", "1", "--arms", "onpolicy_jsd_own"])
    one = B.run(args)
    other = B.run(B.parse(TINY + ["--seed0", "3", "--seeds", "1", "--arms", "onpolicy_jsd_own"]))
    assert one["teacher"] == other["teacher"]
    assert one["seeds"][0]["init"]["digest"] != other["seeds"][0]["init"]["digest"]
    a, b = one["seeds"][0]["arms"], other["seeds"][0]["arms"]
    assert a["onpolicy_jsd_own"]["digest"] != b["onpolicy_jsd_own"]["digest"]


def test_summary_pairs_arms_by_seed():
    def row(seed, init, a, b):
        arms = {"own_step": {"acc": a, "valid": a}, "plain_fkl": {"acc": b, "valid": 0.5}}
        return {"seed": seed, "init": {"acc": init, "valid": 0.0}, "arms": arms}

    out = {
        "teacher": {"acc": 1.0, "valid": 1.0},
        "seeds": [row(0, 0.2, 0.5, 0.4), row(1, 0.2, 0.9, 0.6)],
    }
    res = B.summary(out)
    m, lo, hi = res["contrasts"]["own_step - plain_fkl"]["acc"]
    # differences 0.1 and 0.3: mean 0.2, sd 0.1414, se 0.1, t(0.975, 1 dof) = 12.7062
    assert m == pytest.approx(0.2)
    assert lo == pytest.approx(0.2 - 1.270620) and hi == pytest.approx(0.2 + 1.270620)
    assert res["arms"]["own_step"]["acc_vs_init"][0] == pytest.approx(0.5)
    assert "own_step - own_step_shuffled" not in res["contrasts"]  # only arms that ran


def test_runs_of_other_arms_merge_into_one(tmp_path):
    def go(*arms):
        return B.run(B.parse(TINY + ["--seeds", "2", "--arms", *arms]))

    both, a, b = go("own_step", "plain_fkl"), go("own_step"), go("plain_fkl", "own_step")
    merged = B.merge([a, b])
    assert merged["seeds"] == [
        {**row, "arms": {k: row["arms"][k] for k in ("own_step", "plain_fkl")}}
        for row in both["seeds"]
    ]
    assert a["seeds"][0]["arms"] == {"own_step": both["seeds"][0]["arms"]["own_step"]}  # unchanged
    (tmp_path / "a.json").write_text(B.json.dumps(a))
    (tmp_path / "b.json").write_text(B.json.dumps(b))
    files = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert B.main(["--report", *files]) == merged
    short = B.merge([{**b, "seeds": b["seeds"][1:]}, a])  # a stopped run: seed 1 only
    assert short["seeds"] == merged["seeds"][1:]
    b["seeds"][1]["arms"]["own_step"]["acc"] += 0.25
    with pytest.raises(ValueError, match="arm own_step differs"):
        B.merge([a, b])
    halves = B.merge([{**both, "seeds": both["seeds"][1:]}, {**both, "seeds": both["seeds"][:1]}])
    assert halves["seeds"] == both["seeds"]  # runs of other seeds: their union, in seed order
    plain_only = {**b, "seeds": [{**b["seeds"][1], "arms": {"plain_fkl": {"acc": 0.1}}}]}
    with pytest.raises(ValueError, match="no seed has every arm"):
        B.merge([{**a, "seeds": a["seeds"][:1]}, plain_only])
    with pytest.raises(ValueError, match="different teachers"):
        B.merge([a, {**a, "teacher": {**a["teacher"], "acc": 2.0}}])
