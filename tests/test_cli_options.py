"""Every verb's flags agree with the option they set, so a default lives in one place.

A flag built from an options dataclass field (``ecif.cli.options.add_field``) must carry that
field's default (as parsed), help text and choices; any other flag that sets a library
option is listed in ``FUNCTION_PARAMS`` and must carry that function parameter's default.
The remaining flags (inputs, outputs, switches of the command line itself) are listed in
``CLI_ONLY``; a flag in none of these makes the test fail, so a new flag is placed on purpose.
"""

from __future__ import annotations

import argparse
import inspect

import pytest

import ecif
from ecif.audit.clean import compare_cleaning
from ecif.audit.export import export_audit
from ecif.audit.retrain import compare_retraining
from ecif.audit.shards import score_shards
from ecif.audit.trace_cache import precompute
from ecif.audit.verify import verify
from ecif.cli import build_parser, main
from ecif.cli.options import FIELD, add_field
from ecif.data.index import VectorIndex
from ecif.options import default_of, field_of

# (verb, dest) -> (function, parameter, how the flag's value becomes the parameter's)
FUNCTION_PARAMS = {
    ("embed", "model"): (ecif.embed, "model", None),
    ("embed", "pretrained"): (ecif.embed, "pretrained", None),
    ("embed", "id_col"): (ecif.embed, "id_col", None),
    ("embed", "caption_col"): (ecif.embed, "caption_col", None),
    ("embed", "image_col"): (ecif.embed, "image_col", None),
    ("embed", "batch_size"): (ecif.embed, "batch_size", None),
    ("embed", "distributor"): (ecif.embed, "distributor", None),
    ("embed", "scheduler"): (ecif.embed, "scheduler", None),
    ("embed", "cache_features"): (ecif.embed, "cache_features", None),
    ("embed", "cache_blocks"): (ecif.embed, "cache_blocks", None),
    ("score", "distributor"): (score_shards, "distributor", None),
    ("score", "scheduler"): (score_shards, "scheduler", None),
    ("score", "allow_model_mismatch"): (score_shards, "allow_model_mismatch", None),
    ("index", "kind"): (VectorIndex.build, "kind", None),
    ("index", "nlist"): (VectorIndex.build, "nlist", None),
    ("index", "nprobe"): (VectorIndex.build, "nprobe", None),
    ("index", "chunk_size"): (VectorIndex.build, "chunk", None),
    ("index", "seed"): (VectorIndex.build, "seed", None),
    ("index", "norms"): (precompute, "probes", None),
    ("index", "context_top"): (precompute, "context_top", None),
    ("clean", "seed"): (compare_cleaning, "seed", None),
    ("clean", "count"): (compare_cleaning, "count", None),
    ("clean", "label_col"): (compare_cleaning, "label_col", None),
    ("clean", "retrain_regime"): (compare_retraining, "regimes", lambda v: (v,)),
    ("clean", "prompt"): (compare_retraining, "template", lambda v: v[0]),
    ("verify", "k"): (verify, "k", None),
    ("verify", "seed"): (verify, "seed", None),
    ("export", "keep"): (export_audit, "keep", None),
    ("export", "drop_flagged"): (export_audit, "drop_flagged", None),
    ("export", "format"): (export_audit, "fmt", None),
}

# flags whose default differs on purpose from the library's, and why
KNOWN_DIFFERENCES = {
    ("embed", "num_workers"): "the command line decodes images in 2 worker processes; "
    "ecif.embed(num_workers=0) stays in the calling process",
}

# inputs, outputs and switches of the command line itself: no library default to agree with
CLI_ONLY = {
    "help",
    "version",
    "verb",
    "inputs",
    "embeddings",
    "output",
    "audit",
    "folder",
    "val",
    "allow_model_mismatch",
    "quiet",
    "image",
    "caption",
    "query_id",
    "test",
    "classes",
    "label",
    "label_col",
    "fraction",
    "keep_output",
    "retrain_model",
    "port",
    "data_root",
}


def verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def parsed(action: argparse.Action):
    """The value a flag's default becomes (argparse runs string defaults through type)."""
    value = action.default
    if isinstance(value, str) and action.type is not None:
        value = action.type(value)
    return value


def field_disagreements(verb: str, parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not hasattr(action, FIELD):
            continue
        cls, name = getattr(action, FIELD)
        f, flag = field_of(cls, name), f"ecif {verb} {'/'.join(action.option_strings)}"
        if parsed(action) != default_of(cls, name):
            out.append(f"{flag}: default {parsed(action)!r}, {cls.__name__}.{name} says "
                       f"{default_of(cls, name)!r}")  # fmt: skip
        if not (action.help or "").startswith(f.metadata["help"]):
            out.append(f"{flag}: help differs from {cls.__name__}.{name}'s")
        choices = f.metadata.get("choices")
        if choices and action.choices is not None and tuple(action.choices) != choices:
            out.append(f"{flag}: choices {action.choices} but {cls.__name__}.{name}: {choices}")
    return out


def function_disagreements(verb: str, parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        key = (verb, action.dest)
        if action.help == argparse.SUPPRESS or hasattr(action, FIELD) or key in KNOWN_DIFFERENCES:
            continue
        if key in FUNCTION_PARAMS:
            fn, param, convert = FUNCTION_PARAMS[key]
            want = inspect.signature(fn).parameters[param].default
            got = parsed(action)
            got = convert(got) if convert and got is not None else got
            if got != want:
                out.append(f"ecif {verb} {action.dest}: default {got!r}, {fn.__qualname__}"
                           f"({param}=) says {want!r}")  # fmt: skip
        elif action.dest not in CLI_ONLY:
            out.append(f"ecif {verb} {action.dest}: maps to no options field or parameter")
    return out


@pytest.mark.parametrize("verb", sorted(verbs()))
def test_every_flag_agrees_with_the_option_it_sets(verb):
    parser = verbs()[verb]
    bad = field_disagreements(verb, parser) + function_disagreements(verb, parser)
    assert not bad, "\n".join(bad)


def test_the_options_verbs_build_their_flags_from_the_fields():
    """score, trace and demo set only fields of their options class (no re-declared flag)."""
    from ecif.audit.demo import DemoArgs

    owners = {"score": ecif.AuditArgs, "trace": ecif.TraceArgs, "demo": DemoArgs}
    for verb, cls in owners.items():
        built = {getattr(a, FIELD)[1] for a in verbs()[verb]._actions if getattr(a, FIELD, None)}
        names = {f for f in cls.__dataclass_fields__}
        assert built and built <= names, (verb, built - names)
        others = {
            a.dest
            for a in verbs()[verb]._actions
            if not hasattr(a, FIELD) and a.help != argparse.SUPPRESS  # (old spellings)
        }
        assert not others & names, (verb, others & names)


def test_the_check_catches_a_drifted_default_and_help():
    p = argparse.ArgumentParser()
    add_field(p, ecif.FitArgs, "batch_size", type=int, default=128)  # drifted default
    add_field(p, ecif.FitArgs, "seed", type=int, help="another text")
    bad = "\n".join(field_disagreements("x", p))
    assert "default 128, FitArgs.batch_size says 256" in bad
    assert "--seed: help differs from FitArgs.seed's" in bad


def test_score_flags_make_the_audit_args_and_its_defaults():
    from ecif.cli.common import audit_args_from
    from ecif.device import resolve_device

    args = audit_args_from(verbs()["score"].parse_args(["emb", "-o", "out"]))
    assert args == ecif.AuditArgs(device=resolve_device("auto"))
    args = audit_args_from(verbs()["score"].parse_args(["emb", "-o", "o", "--solver", "cg"]))
    assert args.solver == "cg" and args.solver_args().solver == "cg"
    args = audit_args_from(verbs()["score"].parse_args(["emb", "-o", "o", "--probes", "0"]))
    assert args.probes == 0.0
    with pytest.raises(SystemExit):
        verbs()["score"].parse_args(["emb", "-o", "o", "--probes", "1.5"])


def test_trace_takes_its_old_flag_method_with_a_warning(capsys):
    from ecif.cli.trace import trace_args_from

    p = verbs()["trace"]
    assert "--method" not in p.format_help()
    args = p.parse_args(["AUDIT", "--method", "exact"])
    assert "--method is the old name of --solver" in capsys.readouterr().err
    assert args.solver == "exact" and trace_args_from(args).solver == "exact"
    assert p.parse_args(["AUDIT"]).solver == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["AUDIT", "--method", "newton"])  # the same choices as --solver


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_error_line(capsys, tmp_path):
    assert main(["score", str(tmp_path), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: device 'cuda' asked for, but no CUDA device is available"
