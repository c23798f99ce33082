"""Kill a real ``ecif embed`` subprocess mid-run, rerun, and get every row exactly once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import ecif
from ecif import EmbeddingSet, datasets

SLOW_CLI = [sys.executable, str(Path(__file__).with_name("slow_cli.py"))]  # 0.25 s a batch


def wait_for_first_part(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Until the embed run in ``proc`` has published part 0 of ``out`` (it must not exit)."""
    first = out / "metadata" / "metadata_0.parquet"
    deadline = time.time() + timeout
    while not first.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no part appeared"
        time.sleep(0.02)


def test_kill_then_rerun_gives_every_row_exactly_once(tmp_path, tiny_clip_dir):
    data = datasets.shapes(96, seed=11, noise=0.1)
    data.to_parquet(tmp_path / "shards", shard_size=6)  # 16 small shards -> 16 parts
    model = f"local-dir:{tiny_clip_dir}"
    out = tmp_path / "out"
    # slow the child down (0.25 s per batch of 3 -> ~8 s for 96 rows) so the kill lands mid-run
    cmd = [*SLOW_CLI, "embed", str(tmp_path / "shards"), "-o", str(out),
           "--model", model, "--batch-size", "3", "--num-workers", "0", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_first_part(proc, out)
    time.sleep(0.4)  # let it be inside a later part
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in (out / "metadata").glob("metadata_*.parquet"))
    assert 1 <= len(finished) < 16, f"kill did not land mid-run: {finished}"

    res = ecif.embed(tmp_path / "shards", out, model=model, batch_size=8)
    assert res.parts_skipped == len(finished) and res.parts_written == 16 - len(finished)
    assert res.ok + res.skipped == 96 and res.failed == 0
    assert not list(out.rglob(".*.tmp")), "temp files left behind"

    es = EmbeddingSet.load(out)
    assert len(es) == 96
    assert sorted(es.ids.tolist()) == sorted(data.frame["key"].tolist())
    assert es.ids.tolist() == data.frame["key"].tolist()  # and in input order
    clean = tmp_path / "clean"
    ecif.embed(tmp_path / "shards", clean, model=model, batch_size=8)
    ref = EmbeddingSet.load(clean)
    np.testing.assert_allclose(es.image.astype(np.float32), ref.image.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(es.text.astype(np.float32), ref.text.astype(np.float32), atol=2e-3)


def test_ctrl_c_says_how_to_resume_and_the_rerun_completes(tmp_path, tiny_clip_dir):
    data = datasets.shapes(48, seed=12, noise=0.1)
    data.to_parquet(tmp_path / "shards", shard_size=6)  # 8 parts
    model = f"local-dir:{tiny_clip_dir}"
    out = tmp_path / "out"
    args = ["embed", str(tmp_path / "shards"), "-o", str(out),
            "--model", model, "--batch-size", "3", "--num-workers", "2", "--quiet"]  # fmt: skip
    # its own process group, as a shell runs it: Ctrl-C reaches it and its loader workers
    # with SIGINT at its default, as in an interactive shell: a shell that starts the suite in
    # the background (`pytest &`) sets it to ignored, which children inherit, and Python then
    # installs no KeyboardInterrupt handler (the run completed, exit 0)
    proc = subprocess.Popen(
        [*SLOW_CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_first_part(proc, out)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.decode().strip() == "interrupted; rerun the same command to resume"
    assert "Traceback" not in stderr.decode() and stdout == b""
    finished = sorted(p.name for p in (out / "metadata").glob("metadata_*.parquet"))
    assert 1 <= len(finished) < 8, f"the interrupt did not land mid-run: {finished}"
    assert not list(out.rglob(".*.tmp")), "the interrupted part left temp files"

    cmd = [sys.executable, "-m", "ecif", *args]  # the real entry point, at full speed
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped={6 * len(finished)}" in rerun.stdout
    es = EmbeddingSet.load(out)
    assert es.ids.tolist() == data.frame["key"].tolist()  # every row exactly once, in order


def test_loader_workers_leave_ctrl_c_to_the_main_process_and_hang_ups_quiet():
    """What a decode worker runs first (a 1-in-20 race before: the main process interrupted
    while taking a batch's shared memory, and the worker printed a BrokenPipeError traceback
    under the resume hint). In a child process: SIGINT does not stop it, a broken pipe reported
    the way multiprocessing's resource sharer reports it prints nothing, any other error does."""
    code = """
import os, signal, sys
from ecif.data.embed_stream import _leave_ctrl_c_to_the_main_process as init
init(0)
os.kill(os.getpid(), signal.SIGINT)
for err in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(), ValueError("real")):
    try:
        raise err
    except Exception:
        sys.excepthook(*sys.exc_info())
print("alive")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "alive\n", res.stderr
    assert "ValueError: real" in res.stderr
    assert "BrokenPipe" not in res.stderr and "ConnectionReset" not in res.stderr
