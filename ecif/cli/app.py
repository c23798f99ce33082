"""`ecif app`: the Streamlit auditing app on an audit folder (the demo audit by default)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ecif.cli.options import add_field

NAME = "app"
HELP = "open the auditing app (Streamlit) on an audit folder"
DESCRIPTION = """Start the Streamlit app on 127.0.0.1: overview, suspects (filter, export, mark
reviewed), pair detail and trace-back. AUDIT_FOLDER is what `ecif demo` or `ecif score`
wrote; without it the app opens ./ecif-demo, building the demo audit first if it is
missing (about a minute, no downloads)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audit", nargs="?", default=None, help="audit folder (default: ./ecif-demo)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (127.0.0.1 only)")
    from ecif.audit.demo import DemoArgs

    add_field(
        p,
        DemoArgs,
        "output",
        "--demo-output",
        dest="demo_output",
        note="; built there when no audit folder is given and it is missing",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="folder that now holds the input shards, if they moved since `ecif embed` "
        "(thumbnails are read from them); if not given: the paths in the manifest",
    )


def streamlit_command(folder: Path, port: int) -> list[str]:
    """The `streamlit run` command line: local-only, headless, no usage statistics."""
    from ecif.app import APP_SCRIPT

    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_SCRIPT),
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--server.fileWatcherType",
        "none",
        "--",
        str(folder),
    ]


def run(args: argparse.Namespace) -> int:
    from ecif.app.support import AUDIT_ENV, DATA_ROOT_ENV
    from ecif.audit.folder import AuditFolderError, read_audit

    if args.audit is None:
        folder = Path(args.demo_output)
        if not (folder / "audit.json").exists():
            from ecif.audit.demo import DemoArgs, run_demo

            print(f"no audit given and {folder} is missing: building the demo audit there")
            run_demo(DemoArgs(output=str(folder)))
    else:
        folder = Path(args.audit)
    try:
        read_audit(folder)
    except AuditFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = folder.resolve()
    env = dict(os.environ, **{AUDIT_ENV: str(folder)})
    if args.data_root:
        if not Path(args.data_root).is_dir():
            print(f"error: --data-root {args.data_root}: no such folder", file=sys.stderr)
            return 2
        env[DATA_ROOT_ENV] = str(Path(args.data_root).resolve())
    print(f"ecif app on {folder}: http://127.0.0.1:{args.port}", flush=True)
    cmd = streamlit_command(folder, args.port)
    if os.name == "posix":  # become the server: a signal to `ecif app` reaches Streamlit itself
        os.execve(cmd[0], cmd, env)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
