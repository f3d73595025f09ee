"""Reports open in headless Chromium from file://, draw something, and request nothing external.

Needs the Debian packages ``chromium`` (and ``chromium-driver`` for other tools); install them with
``.ci/install_browser.sh``. Skipped when no Chromium is on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

pytestmark = pytest.mark.browser

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
if CHROMIUM is None and os.environ.get("CAPSMED_REQUIRE_BROWSER") == "1":  # CI: never skip
    raise RuntimeError("CAPSMED_REQUIRE_BROWSER=1 but Chromium is not installed")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (run .ci/install_browser.sh)")


def _screenshot(page: Path, tmp: Path, name: str) -> tuple[np.ndarray, list[dict]]:
    """Render ``page`` to a PNG; return its pixels and the network requests the page made."""
    png, netlog, profile = tmp / f"{name}.png", tmp / f"{name}.netlog.json", tmp / f"{name}-prof"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-quic", "--disable-extensions", f"--user-data-dir={profile}",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--log-net-log={netlog}",
           f"--screenshot={png}", "--window-size=1200,900", page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert png.is_file(), f"no screenshot; chromium said: {res.stderr[-2000:]}"
    return imread(png), _page_requests(netlog)


def _page_requests(netlog: Path) -> list[dict]:
    """Network requests started on behalf of a page.

    Chromium itself contacts update and time servers (initiator "not an origin"); requests that a
    file:// page makes carry the page's opaque origin ("null") and a file:// isolation key.
    """
    doc = json.loads(netlog.read_text(encoding="utf-8", errors="replace") or "{}")
    types = {v: k for k, v in doc.get("constants", {}).get("logEventTypes", {}).items()}
    out = []
    for event in doc.get("events", []):
        params = event.get("params") or {}
        if types.get(event.get("type")) != "URL_REQUEST_START_JOB" or "url" not in params:
            continue
        url = params["url"]
        if url.startswith(("file:", "data:")):
            continue
        browser_own = params.get("initiator") == "not an origin" and "file://" not in str(
            params.get("network_isolation_key", ""))
        if not browser_own:
            out.append(params)
    return out


def _assert_drawn(pixels: np.ndarray) -> None:
    grey = pixels[..., :3].mean(axis=-1)
    assert grey.std() > 0.05, "screenshot is blank"
    assert (grey < 0.5).mean() > 0.005, "screenshot has almost no dark pixels (no text drawn)"


@needs_chromium
def test_index_and_study_render_without_external_requests(rendered, facts, tmp_path):
    shots = {
        "index": rendered["index"],
        "study": rendered["studies"][(facts.SEG, "ucaps")]["case_005"],
    }
    for name, page in shots.items():
        pixels, requests = _screenshot(page, tmp_path, name)
        _assert_drawn(pixels)
        assert requests == [], f"{name} made external requests: {[r['url'] for r in requests]}"


@needs_chromium
def test_request_detection_is_not_vacuous(tmp_path):
    """A page that loads a remote image is caught by the same check."""
    page = tmp_path / "remote.html"
    page.write_text('<!DOCTYPE html><html><body><h1>remote</h1>'
                    '<img src="http://example.invalid/x.png" alt="x"></body></html>')
    _, requests = _screenshot(page, tmp_path, "remote")
    assert [r["url"] for r in requests] == ["http://example.invalid/x.png"]
