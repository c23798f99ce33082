"""Options and feature caches an audit cannot run with end in one clear AuditInputError
before any fit (an `error:` line and exit 2 on the command line), not a traceback from deep
inside the fit. Each case below crashed, or ran on meaningless inputs, before the check."""

import dataclasses

import pytest

import ecif
from ecif.audit.checks import AuditInputError, check_options
from ecif.cli import main
from ecif.data.features import load_features
from tests.test_audit_shards import _folder
from tests.test_cli_errors import _no_fit


def _error_line(err: str, *needles: str) -> None:
    """One `error:` line naming ``needles``, no traceback (the folder's dropped failed row may
    be logged above it)."""
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(n in errors[0] for n in needles), errors[0]


@pytest.mark.parametrize(
    "bad, named",
    [
        (dict(dtype="float16"), "dtype"),  # was a KeyError in the fit
        (dict(lam=float("inf")), "lam"),  # overflowed inside L-BFGS
        (dict(logit_scale=float("nan")), "logit_scale"),
        (dict(lam=-1.0), "lam"),
        (dict(seed=-1), "seed"),  # numpy's error, naming no option
        (dict(batch_size=1), "batch_size"),  # a batch of one pair: every influence 0
        (dict(lora_rank=0), "lora_rank"),
        (dict(lora_rank=2.5), "lora_rank"),  # a TypeError from torch.randn
        (dict(params="bogus"), "params"),
        (dict(solver="bogus"), "solver"),  # ignored in the model modes before
        (dict(probes=1.5), "probes"),
    ],
)
def test_bad_options_are_named(bad, named):
    with pytest.raises(AuditInputError, match=f"^{named} must"):
        check_options(ecif.AuditArgs(**bad))


def test_good_options_pass():
    check_options(ecif.AuditArgs())
    check_options(ecif.AuditArgs(lam="model", logit_scale="10", batch_size=2, lora_blocks=1))
    check_options(ecif.AuditArgs(device="cuda:1"))  # resolve_device says if it exists


def test_the_api_and_the_cli_check_options_before_any_fit(tmp_path, capsys, monkeypatch):
    folder, val = _folder(tmp_path)
    _no_fit(monkeypatch)
    train = ecif.EmbeddingSet.load(folder)
    with pytest.raises(AuditInputError, match="^seed"):
        ecif.Auditor(train, val, ecif.AuditArgs(seed=-1)).run()
    with pytest.raises(AuditInputError, match="validation set has 1 usable pair"):
        ecif.Auditor(train, val.subset([0])).run()
    out = tmp_path / "out"
    assert main(["score", str(folder), "-o", str(out), "--seed", "-1", "--quiet"]) == 2
    _error_line(capsys.readouterr().err, "seed must be a whole number >= 0")
    with pytest.raises(SystemExit):  # argparse: exit 2 with the option named
        main(["score", str(folder), "-o", str(out), "--lam", "inf"])
    assert "--lam: expected 'auto' or a finite positive number" in capsys.readouterr().err
    val.subset([0]).save(tmp_path / "val1")
    assert main(["score", str(folder), "--val", str(tmp_path / "val1"), "-o", str(out)]) == 2
    _error_line(capsys.readouterr().err, "1 usable pair(s)", "at least 2")
    assert not out.exists()


@pytest.fixture(scope="module")
def caches(projection_folders, tiny_clip_dir, tmp_path_factory):
    """The projection caches of conftest, and 24 shapes pairs with a lora cache (1 block)."""
    from ecif import datasets

    root = tmp_path_factory.mktemp("lora-cache")
    datasets.shapes(24, seed=3, noise=0.0).to_parquet(root / "shards")
    ecif.embed(root / "shards", root / "lora", model=f"local-dir:{tiny_clip_dir}",
               cache_features="lora")  # fmt: skip
    out = {name: (ecif.EmbeddingSet.load(f), load_features(f)) for name, f in projection_folders.items() if name != "root"}  # fmt: skip
    out["lora"] = (ecif.EmbeddingSet.load(root / "lora"), load_features(root / "lora"))
    return out


def _audit(caches, args, train="train", val="val", train_f=None, val_f=None):
    (tr, tf), (va, vf) = caches[train], caches[val] if val else (None, None)
    return ecif.Auditor(
        tr, va, args, train_features=train_f or tf, val_features=val_f or vf
    ).choose()


def test_feature_caches_that_do_not_fit_the_mode_are_refused_before_the_fit(caches, monkeypatch):
    import ecif.audit.model_signals as ms

    def boom(*a, **k):
        raise AssertionError("the model was fit before its inputs were checked")

    monkeypatch.setattr(ms, "fit_model", boom)
    proj = ecif.AuditArgs(params="projection")
    with pytest.raises(AuditInputError, match="'lora', 1 block.* were not cached with"):
        _audit(caches, proj, val="lora")  # validation features of another cache kind
    other = dataclasses.replace(caches["val"][1])  # the same kind from another model
    other.init = {**other.init, "tensors": dict(other.init["tensors"])}
    other.init["tensors"]["image_proj"] = other.init["tensors"]["image_proj"] + 1e-3
    with pytest.raises(AuditInputError, match="were not cached with"):
        _audit(caches, proj, val_f=other)
    with pytest.raises(
        AuditInputError, match="a 'projection' cache: embed with --cache-features lora"
    ):
        _audit(caches, ecif.AuditArgs(params="lora"))
    tr, tf = caches["train"]
    fewer = dataclasses.replace(tf, image=tf.image[:10], text=tf.text[:10], ids=tf.ids[:10])
    with pytest.raises(AuditInputError, match="has 10 rows but its embeddings 160"):
        _audit(caches, proj, val=None, train_f=fewer)  # was a pandas error after the fit
    with pytest.raises(AuditInputError, match="lora_blocks=2: the feature cache was cut 1"):
        _audit(caches, ecif.AuditArgs(params="lora", lora_blocks=2), train="lora", val=None)
