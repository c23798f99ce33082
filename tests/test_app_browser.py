"""End to end in a real headless browser: `ecif app`, started from another working folder than
the embedding's (which was given relative paths), shows the suspects page's thumbnails and
every row of its table, draws the overview, and the pages ask nothing of any host but
127.0.0.1. Needs Debian's chromium at /usr/bin/chromium (installed by .ci/run)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ecif app exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("ecif app did not answer on /_stcore/health")


def stop(proc: subprocess.Popen) -> None:
    """End the server and anything it started (it runs in its own session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")
def test_suspects_page_renders_thumbnails_in_chromium(small_audit, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    manifest = json.loads((small_audit / "embeddings" / "train" / "manifest.json").read_text())
    assert manifest["parts"][0]["source_relative"].startswith("..")  # embedded from elsewhere
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from ecif.cli import main; sys.exit(main())"]
    cmd += ["app", str(small_audit), "--port", str(port)]
    log = open(tmp_path / "app.log", "w")
    elsewhere = tmp_path / "another-working-folder"
    elsewhere.mkdir()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=elsewhere
    )
    local = f"http://127.0.0.1:{port}"
    outside: list[str] = []
    try:
        wait_healthy(port, proc)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url.startswith((local, "data:", "blob:", "ws://127.0.0.1"))
                    else outside.append(r.url)
                ),
            )
            page.goto(f"{local}/", timeout=60_000)
            page.locator(
                "[data-testid*='VegaLite'] canvas, [data-testid*='VegaLite'] svg"
            ).first.wait_for(timeout=60_000)
            page.goto(f"{local}/suspects", timeout=60_000)
            page.get_by_text("This page's images").wait_for(timeout=60_000)
            imgs = page.locator("[data-testid='stImage'] img")
            imgs.first.wait_for(timeout=30_000)
            imgs.last.scroll_into_view_if_needed()  # thumbnails below the fold load lazily
            page.wait_for_function(
                "() => [...document.querySelectorAll(\"[data-testid='stImage'] img\")]"
                ".every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            page.locator("h1").first.scroll_into_view_if_needed()
            widths = imgs.evaluate_all("els => els.map(e => e.naturalWidth)")
            assert len(widths) >= 10 and all(w > 0 for w in widths)
            assert page.get_by_text("Traceback").count() == 0
            assert page.get_by_text("image shard not found").count() == 0
            box = page.locator("[data-testid='stDataFrame']").first.bounding_box()
            assert box["height"] >= 51 * 60, box  # the page's 50 rows and the header, unscrolled
            header_cells = page.locator(  # the grid lists the headers it shows
                "[data-testid='stDataFrame'] [role='columnheader']"
            )
            header_cells.last.wait_for(state="attached", timeout=30_000)  # drawn after the frame
            headers = header_cells.all_inner_texts()
            assert headers[-1] == "reviewed", headers  # the last column fits, none hidden
            shot = tmp_path / "suspects.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            browser.close()
        assert not outside, f"requests outside 127.0.0.1: {outside}"
    finally:
        stop(proc)
        log.close()
    print(f"screenshot: {Path(shot)}")
