"""The one atomic writer (``ecif.atomic``) and the one Dask driver (``ecif.distributed``)."""

import ast
import os
import threading
from pathlib import Path

import pandas as pd
import pytest

from ecif import atomic
from ecif.distributed import RETRIES, run_tasks

PACKAGE = Path(__file__).resolve().parents[1] / "ecif"


def test_atomic_path_publishes_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic.write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(path) as tmp:
            assert tmp.name == f".f.txt.{os.getpid()}.tmp"
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and not list(path.parent.glob(atomic.TEMP_GLOB))
    atomic.write_parquet_atomic(tmp_path / "t.parquet", pd.DataFrame({"a": [1]}), {"k": [1, "x"]})
    assert atomic.read_parquet_meta(tmp_path / "t.parquet") == {"k": [1, "x"]}


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_text("x")
    with atomic.atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
        assert not (out / "weights").exists()  # nothing visible before the swap
    assert sorted(p.name for p in out.iterdir()) == ["weights"]
    with pytest.raises(ValueError):
        with atomic.atomic_dir(out) as tmp:
            (tmp / "weights").write_text("half")
            raise ValueError
    assert (out / "weights").read_text() == "new" and not list(tmp_path.glob(atomic.TEMP_GLOB))


def test_only_ecif_atomic_renames_files():
    """Every file ecif writes goes through ecif.atomic: no os.replace/os.rename elsewhere."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "atomic.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            f = getattr(node, "func", None)
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                if f.value.id == "os" and f.attr in ("replace", "rename"):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, found


_calls: dict[int, int] = {}
_lock = threading.Lock()


def flaky_square(x: int) -> int:
    """Fails on its first call for each x (a task whose worker died), then succeeds."""
    with _lock:
        _calls[x] = _calls.get(x, 0) + 1
        first = _calls[x] == 1
    if first:
        raise OSError(f"worker lost while computing {x}")
    return x * x


def test_run_tasks_retries_and_returns_results_in_order():
    _calls.clear()
    seen = []
    out = run_tasks(
        flaky_square,
        [(k,) for k in range(5)],
        keys=[f"square-{k}" for k in range(5)],
        on_result=lambda i, r: seen.append((i, r)),
        processes=False,
    )
    assert out == [0, 1, 4, 9, 16]
    assert sorted(seen) == [(k, k * k) for k in range(5)]
    assert all(n == 2 for n in _calls.values()) and RETRIES >= 1
    assert run_tasks(flaky_square, []) == []
