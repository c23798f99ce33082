"""Bad inputs and options end in one `error:` line on stderr and exit 2, before any fit and
with nothing written; --help names each default once."""

import json
import re

import numpy as np
import pandas as pd
import pytest

import ecif
from ecif.cli import VERB_MODULES, build_parser, main
from ecif.data import layout
from tests.test_audit_shards import _folder

FAST = ["--batch-size", "16", "--logit-scale", "10", "--quiet"]


def _one_error_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def _files(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A synthetic embedding folder (3 shards, one failed row), its val set and an audit."""
    tmp = tmp_path_factory.mktemp("scored")
    folder, val = _folder(tmp)
    val.save(tmp / "val")
    out = tmp / "audit"
    rc = main(["score", str(folder), "--val", str(tmp / "val"), "-o", str(out), *FAST])
    assert rc == 0
    return tmp, folder, out


def _no_fit(monkeypatch):
    """Any fit now fails the test: the checks must come first."""
    import ecif.api

    def boom(*a, **k):
        raise AssertionError("fit ran before the options were checked")

    monkeypatch.setattr(ecif.api, "fit", boom)


@pytest.mark.parametrize("case", ["empty", "missing", "val_missing"])
def test_score_on_missing_or_empty_folders(tmp_path, capsys, monkeypatch, scored, case):
    _no_fit(monkeypatch)
    _, folder, _ = scored
    (tmp_path / "empty").mkdir()
    args = {
        "empty": [str(tmp_path / "empty")],
        "missing": [str(tmp_path / "nope")],
        "val_missing": [str(folder), "--val", str(tmp_path / "nope")],
    }[case]
    out = tmp_path / "out"
    assert main(["score", *args, "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    want = "not an embedding folder" if case == "empty" else "no such folder"
    _one_error_line(err, want)
    assert not out.exists()


@pytest.mark.parametrize("value", ["1.5", "abc", "-3"])
def test_score_bad_threshold_fails_at_parse_time(tmp_path, capsys, monkeypatch, scored, value):
    _no_fit(monkeypatch)
    _, folder, _ = scored
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["score", str(folder), "-o", str(out), "--threshold", value, *FAST])
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err, "--threshold", "ecif score --help")
    assert not out.exists()


def test_score_shards_checks_threshold_before_fitting(tmp_path, monkeypatch, scored):
    from ecif.audit import AuditArgs
    from ecif.audit.checks import AuditInputError
    from ecif.audit.shards import score_shards

    _no_fit(monkeypatch)
    _, folder, _ = scored
    with pytest.raises(AuditInputError, match="fraction"):
        score_shards(folder, tmp_path / "out", None, args=AuditArgs(threshold=1.5))
    assert not (tmp_path / "out").exists()


def test_validation_of_another_width_is_refused_before_the_fit(tmp_path, capsys, monkeypatch):
    folder, _ = _folder(tmp_path, d=8)
    g = np.random.default_rng(0)
    wide = ecif.EmbeddingSet(g.standard_normal((20, 12)), g.standard_normal((20, 12)))
    wide.save(tmp_path / "wide")
    _no_fit(monkeypatch)
    out = tmp_path / "out"
    rc = main(["score", str(folder), "--val", str(tmp_path / "wide"), "-o", str(out), *FAST])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, "widths", "image 12", "image 8")
    assert not out.exists()


def test_all_failed_embeddings_are_one_error(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "emb"
    meta = pd.DataFrame(
        {"key": ["a", "b", "c"], "status": "failed", "error_message": "missing file: x.png"}
    )
    layout.write_part(folder, 0, np.zeros((3, 4)), np.zeros((3, 4)), meta)
    _no_fit(monkeypatch)
    out = tmp_path / "out"
    assert main(["score", str(folder), "-o", str(out), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "0 usable pair", "3 rows failed")
    assert not out.exists()


def _manifest_model(folder, model, pretrained=None):
    path = folder / "manifest.json"
    man = json.loads(path.read_text())
    man.update(model=model, pretrained=pretrained)
    path.write_text(json.dumps(man))


def test_validation_from_another_model_is_refused_unless_allowed(tmp_path, capsys, monkeypatch):
    folder, val = _folder(tmp_path)
    val.save(tmp_path / "val")
    _manifest_model(folder, "ViT-B-32", "laion2b_s34b_b79k")
    _manifest_model(tmp_path / "val", "ViT-B-32", "openai")  # same width, other weights
    out = tmp_path / "out"
    base = ["score", str(folder), "--val", str(tmp_path / "val"), "-o", str(out), *FAST]
    with monkeypatch.context() as m:
        _no_fit(m)
        assert main(base) == 2
        _one_error_line(capsys.readouterr().err, "ViT-B-32 (pretrained openai)", "laion2b")
        assert not out.exists()
    assert main([*base, "--allow-model-mismatch"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "pretrained openai" in err
    info = json.loads((out / "audit.json").read_text())
    assert any("openai" in w for w in info["warnings"])
    assert info["validation_model"] == {"model": "ViT-B-32", "pretrained": "openai"}


def test_clean_and_verify_errors(scored, capsys, tmp_path):
    tmp, _, audit = scored
    before = _files(audit)
    val = ["--val", str(tmp / "val")]
    cases = [
        (["clean", str(audit), *val, "--count", "99999"], "between 1 and 178"),
        (["clean", str(audit), *val, "--fraction", "1.5"], "(0, 1)"),
        (["verify", str(audit), *val, "-k", "2"], "between 3 and 179"),
        (["verify", str(tmp_path), *val], "not an audit folder"),
        (["clean", str(tmp_path / "nope"), *val], "no such folder"),
        (["verify", str(audit), "--val", str(tmp_path / "nope")], "no such folder"),
        (["clean", str(audit), *val, "--label-col", "nope"], "label column 'nope'"),
    ]
    for argv, needle in cases:
        assert main([*argv, "--quiet"]) == 2, argv
        _one_error_line(capsys.readouterr().err, needle)
    assert _files(audit) == before


def test_os_errors_read_as_sentences():
    from ecif.cli.errors import describe

    try:
        open("/no/such/file.jpg")
    except OSError as e:
        assert describe(e) == "/no/such/file.jpg: No such file or directory"
    assert describe(ValueError("two\n  lines")) == "two; lines"


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import ecif.cli.score as score

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(score, "run", interrupted)
    assert main(["score", "x", "-o", "y"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == score.INTERRUPTED and "rerun the same command" in err


def test_help_names_each_default_once_and_every_option_is_explained(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "score" in a.choices)
    for verb in VERB_MODULES:
        p = sub.choices[verb]
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, f"ecif {verb} {action.option_strings or action.dest}: no help"
        text = p.format_help()
        flat = " ".join(text.split())
        assert "(default: None)" not in flat, verb
        assert not re.search(r"default[^()]*\) \(default", flat), verb
        fmt = p.formatter_class(prog="ecif")
        for action in p._actions:
            shown = fmt._get_help_string(action)
            if action.required:
                assert "(default:" not in shown, (verb, action.dest)
            if action.default is None:
                assert not shown.endswith("(default: %(default)s)"), (verb, action.dest)
    score_help = " ".join(sub.choices["score"].format_help().split())
    trace_help = " ".join(sub.choices["trace"].format_help().split())
    for words in ("'ekfac' (no iterations", "'cg' (exact Hessian-vector products"):
        assert words in score_help and words in trace_help
    assert "--solver" in trace_help and "else EK-FAC" not in trace_help
    assert "auto|model|T" in score_help and "calibrates the pretrained similarity" in score_help


def test_python_dash_m_ecif_runs_the_cli():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "ecif", "score", "/no/such/folder", "-o", "/tmp/x-ecif-never"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stdout == ""
    _one_error_line(r.stderr, "/no/such/folder: no such folder")


def test_trace_on_a_missing_image_file_names_the_file(small_audit, tmp_path, capsys):
    missing = tmp_path / "cat.jpg"
    argv = ["trace", str(small_audit), "--image", str(missing), "--caption", "a cat", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    _one_error_line(err, f"{missing}: No such file or directory")
    assert "Errno" not in err


def test_score_on_image_and_text_rows_of_two_widths(tmp_path, capsys, monkeypatch):
    """Image rows 16-d and text rows 24-d: an audit reads their cosine, so it stops with one
    line that says why (it crashed in the scale's calibration, a matmul error), in the API
    and the CLI, before any fit."""
    from ecif.audit.checks import AuditInputError

    _no_fit(monkeypatch)
    g = np.random.default_rng(0)
    x, y = g.standard_normal((40, 16)), g.standard_normal((40, 24))
    es = ecif.EmbeddingSet(
        (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32),
        (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32),
    )
    with pytest.raises(AuditInputError, match="16-d and text embeddings 24-d"):
        ecif.Auditor(es).run()
    es.save(tmp_path / "emb")
    out = tmp_path / "audit"
    assert main(["score", str(tmp_path / "emb"), "-o", str(out), *FAST]) == 2
    _one_error_line(capsys.readouterr().err, "16-d", "24-d", "joint space")
    assert not out.exists() or not _files(out)


@pytest.mark.parametrize(
    "content", ['{"method": "ecif", "options": {', "", "[1, 2]", '{"options": "x"}']
)
@pytest.mark.parametrize("verb", ["trace", "index", "clean", "verify", "export"])
def test_an_unreadable_audit_json_is_one_error_in_every_verb(
    small_audit, tmp_path, capsys, content, verb
):
    """A run cut off while writing audit.json, or a hand edit: JSONDecodeError and
    AttributeError tracebacks before, in each verb that reads it."""
    import shutil

    audit = tmp_path / "audit"
    shutil.copytree(small_audit, audit, ignore=shutil.ignore_patterns("data", "embeddings"))
    (audit / "audit.json").write_text(content)
    val = str(small_audit / "embeddings" / "val")
    argv = {
        "trace": ["trace", str(audit), "--caption", "a red circle", "--quiet"],
        "index": ["index", str(audit), "--quiet", "-o", str(tmp_path / "ix")],
        "clean": ["clean", str(audit), "--val", val, "--quiet"],
        "verify": ["verify", str(audit), "--val", val, "-k", "3", "--quiet"],
        "export": ["export", str(audit), "--keep", "0.5", "--format", "ids", "-o", str(tmp_path / "k.csv")],
    }[verb]  # fmt: skip
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, "audit.json")


def test_trace_against_a_test_set_of_another_width(small_audit, tmp_path, capsys):
    g = np.random.default_rng(0)
    x = g.standard_normal((6, 48)).astype(np.float32)  # the audit's rows are 32-d
    ecif.EmbeddingSet(x, x, ids=[f"t{i}" for i in range(6)]).save(tmp_path / "w48")
    argv = ["trace", str(small_audit), "--query-id", "t0", "--test", str(tmp_path / "w48")]
    assert main([*argv, "--quiet"]) == 2  # a matmul RuntimeError before
    err = capsys.readouterr().err  # (after the note that the index is built in memory)
    _one_error_line(err.splitlines()[-1], "48-d (image)", "embed the test set")
    assert "Traceback" not in err


@pytest.mark.parametrize("flag", ["--nlist", "--nprobe", "--chunk-size"])
def test_index_counts_must_be_positive(small_audit, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:  # faiss TypeError / OverflowError before
        main(["index", str(small_audit), "--kind", "ivf", flag, "-2", "-o", str(tmp_path / "ix")])
    assert e.value.code == 2
    assert f"{flag}: expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, said",
    [
        (["demo", "--n", "-5"], "--n: expected an integer >= 1"),
        (["demo", "--noise", "1"], "--noise: expected a fraction in [0, 1)"),
        (["demo", "--seed", "-1"], "--seed: expected an integer >= 0"),  # numpy's error before
        (["verify", "AUDIT", "--val", "VAL", "--seed", "-1"], "--seed: expected an integer >= 0"),
    ],
)
def test_counts_and_fractions_are_checked_at_parse_time(small_audit, capsys, argv, said):
    argv = [str(small_audit) if a == "AUDIT" else a for a in argv]
    argv = [str(small_audit / "embeddings" / "val") if a == "VAL" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["-k", "--nprobe"])
def test_trace_counts_must_not_be_negative(small_audit, capsys, flag):
    assert (
        main(["trace", str(small_audit), "--caption", "a red circle", flag, "-1", "--quiet"]) == 2
    )
    err = capsys.readouterr().err
    _one_error_line(err.splitlines()[-1], "must be a whole number >=")
    assert "Traceback" not in err


@pytest.mark.parametrize("damaged", ["head.pt", "scores", "index/image.faiss"])
def test_a_damaged_audit_file_is_one_error(small_audit, tmp_path, capsys, damaged):
    """A file cut off while written (or replaced): pickle, Arrow and faiss tracebacks before."""
    import shutil

    audit = tmp_path / "audit"
    shutil.copytree(small_audit, audit, ignore=shutil.ignore_patterns("data", "embeddings"))
    if not (audit / "index").exists():
        assert main(["index", str(audit), "--embeddings", str(small_audit / "embeddings" / "train"), "--quiet"]) == 0  # fmt: skip
        capsys.readouterr()
    target = audit / damaged
    if target.is_dir():
        target = sorted(target.glob("*.parquet"))[0]
    target.write_bytes(b"junk" * 10)
    train = str(small_audit / "embeddings" / "train")
    argv = ["trace", str(audit), "--caption", "a red circle", "--embeddings", train, "--quiet"]
    if damaged == "scores":
        argv = [
            "export",
            str(audit),
            "--keep",
            "0.5",
            "--format",
            "ids",
            "-o",
            str(tmp_path / "k.csv"),
        ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    _one_error_line(err.splitlines()[-1], target.name, "cannot be read")
    assert "Traceback" not in err


def test_export_refuses_to_write_into_the_audit(small_audit, tmp_path, capsys):
    import shutil

    audit = tmp_path / "audit"
    shutil.copytree(small_audit, audit, ignore=shutil.ignore_patterns("data", "embeddings"))
    shard = sorted((audit / "scores").glob("*.parquet"))[0]
    before = shard.read_bytes()
    argv = ["export", str(audit), "--keep", "0.5", "--format", "ids", "-o", str(shard)]
    assert main(argv) == 2  # it overwrote the audit's own score shard before, exit 0
    _one_error_line(capsys.readouterr().err, "overwrite the audit")
    assert shard.read_bytes() == before


@pytest.mark.parametrize(
    "argv, said",
    [
        (["embed", "IN", "OUT", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
        (["embed", "IN", "OUT", "--num-workers", "-1"], "--num-workers: expected an integer >= 0"),
        (["clean", "AUDIT", "--retrain-steps", "0"], "--retrain-steps: expected an integer >= 1"),
        (["clean", "AUDIT", "--retrain-batch-size", "0"], "--retrain-batch-size: expected an"),
    ],
)
def test_embed_and_retrain_counts_are_checked_at_parse_time(tmp_path, capsys, argv, said):
    argv = [str(tmp_path / a.lower()) if a in ("IN", "OUT", "AUDIT") else a for a in argv]
    with pytest.raises(SystemExit) as e:  # DataLoader / ZeroDivisionError tracebacks before
        main(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err


def test_a_damaged_trace_cache_falls_back_with_a_note(small_audit, tmp_path, capsys):
    import shutil

    audit = tmp_path / "audit"
    shutil.copytree(small_audit, audit, ignore=shutil.ignore_patterns("data", "embeddings"))
    train = str(small_audit / "embeddings" / "train")
    assert main(["index", str(audit), "--embeddings", train, "--quiet"]) == 0
    (audit / "index" / "trace.pt").write_bytes(b"junk" * 10)
    capsys.readouterr()
    val = small_audit / "embeddings" / "val"
    qid = str(ecif.EmbeddingSet.load(val).ids[0])
    argv = ["trace", str(audit), "--query-id", qid, "--test", str(val), "--embeddings", train]
    assert main([*argv, "--quiet"]) == 0  # an `error: 174812789` line before
    captured = capsys.readouterr()
    assert "trace.pt cannot be read" in captured.err and "RESPONSIBLE" in captured.out


@pytest.mark.parametrize("column", ["misalign_score", "is_misaligned", "clip_score", "id"])
def test_a_score_shard_without_a_column_is_one_error(small_audit, tmp_path, capsys, column):
    """A shard rewritten by another tool without a column `ecif clean` reads (a KeyError from
    inside the clean before); named with its shard, for clean and export alike."""
    import shutil

    import pyarrow.parquet as pq

    audit = tmp_path / "audit"
    shutil.copytree(small_audit, audit, ignore=shutil.ignore_patterns("data", "embeddings"))
    shard = sorted((audit / "scores").glob("*.parquet"))[1]
    table = pq.read_table(shard)
    id_col = json.loads((audit / "audit.json").read_text()).get("id_column", "id")
    pq.write_table(table.drop([id_col if column == "id" else column]), shard)
    val = str(small_audit / "embeddings" / "val")
    for argv in (
        ["clean", str(audit), "--val", val, "--quiet"],
        ["export", str(audit), "--keep", "0.5", "--format", "ids", "-o", str(tmp_path / "k.csv")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        _one_error_line(err.splitlines()[-1], shard.name, "lacks")
        assert "Traceback" not in err


def test_trace_refuses_embeddings_other_than_the_audits_rows(small_audit, tmp_path, capsys):
    """--embeddings with as many rows as the audit but other content was traced silently (the
    audit's head, norms and indexes applied to rows they were not made from)."""
    import shutil

    from ecif.data.folder_reader import read_part

    train = small_audit / "embeddings" / "train"
    moved, other = tmp_path / "moved", tmp_path / "other"
    shutil.copytree(train, moved)
    shutil.copytree(train, other)
    img, txt, meta = read_part(other, 0)
    txt = np.array(txt)[::-1].copy()  # the same rows, captions' embeddings swapped around
    layout.write_part(
        other, 0, np.array(img), txt, meta, layout.part_kv(layout.part_paths(other, 0)[2])
    )
    caption = str(ecif.audit.read_audit(small_audit)[0]["caption"].iloc[0])
    argv = ["trace", str(small_audit), "--caption", caption, "-k", "1", "--quiet"]
    assert main([*argv, "--embeddings", str(other)]) == 2
    err = capsys.readouterr().err
    _one_error_line(err.splitlines()[-1], "not the rows this audit scored")
    assert main([*argv, "--embeddings", str(moved)]) == 0  # moved, not changed: traced


@pytest.mark.parametrize(
    "lines, said",
    [
        ("\n  \n\n", "0 class prompt(s)"),  # dropped silently: the test captions were used
        ("a red circle\n", "1 class prompt(s)"),  # loss -0
        ("a red circle\na blue square\na red circle\n", "given twice: ['a red circle']"),
    ],
)
def test_class_prompts_need_two_distinct_lines(small_audit, tmp_path, capsys, lines, said):
    classes = tmp_path / "classes.txt"
    classes.write_text(lines)
    val = small_audit / "embeddings" / "val"
    qid = str(ecif.EmbeddingSet.load(val).ids[0])
    argv = ["trace", str(small_audit), "--query-id", qid, "--test", str(val)]
    assert main([*argv, "--classes", str(classes), "--label", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    _one_error_line(err.splitlines()[-1], said)


def test_trace_output_must_be_csv_or_parquet(small_audit, tmp_path, capsys):
    """-o x.json wrote CSV under a .json name."""
    argv = ["trace", str(small_audit), "--caption", "x", "-o", str(tmp_path / "x.json")]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err.splitlines()[-1], "write .csv or .parquet")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--caption", "  "], "--caption is empty"),
        (["--image", "IMG", "--caption", ""], "--caption is empty"),
        (["--query-id", "3", "--test", "VAL", "--image", "IMG"], "two queries"),
        (["--query-id", "3", "--test", "VAL", "--caption", "a cat"], "two queries"),
        (
            ["--image", "IMG", "--caption", "a cat", "--classes", "CLS", "--label", "0"],
            "two queries",
        ),
        (["--caption", "a cat", "--classes", "CLS", "--label", "0"], "two queries"),
        (["--classes", "CLS", "--label", "0"], "needs an image"),
        (["--image", "IMG", "--caption", "a cat", "--label", "0"], "--label is the true class"),
        (["--caption", "a cat", "--test", "VAL"], "give --query-id"),
        (["--image", "DIR", "--caption", "a cat"], "a folder, not a file"),
        (["--caption", "a cat", "-o", "DIR/x.csv"], "not a folder this user can write in"),
        (["--caption", "a cat", "-o", "DIR"], "write .csv or .parquet"),
    ],
)
def test_trace_flags_that_would_be_ignored_or_fail_late(small_audit, tmp_path, capsys, flags, said):
    """Each of these ran a trace that silently dropped a flag (an image query ignoring its
    --classes, a --query-id ignoring --image), traced an empty caption, or printed the lists
    before failing on -o: now one error line before the audit is read."""
    img = tmp_path / "x.png"
    img.write_bytes(b"not read: the flags fail first")
    cls = tmp_path / "classes.txt"
    cls.write_text("a cat\na dog\n")
    (tmp_path / "file").write_text("a file, not a folder")
    where = {"IMG": str(img), "CLS": str(cls), "VAL": str(small_audit / "embeddings" / "val")}
    where["DIR"] = str(tmp_path / "file") if said.startswith("not a folder") else str(tmp_path)
    argv = [where.get(f, f.replace("DIR", where["DIR"])) for f in flags]
    assert main(["trace", str(small_audit), *argv, "--quiet"]) == 2
    out = capsys.readouterr()
    assert out.out == "", out.out  # nothing traced, nothing printed
    _one_error_line(out.err, said)
