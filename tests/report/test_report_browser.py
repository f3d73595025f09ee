"""Reports open in headless Chromium from file://, draw something, and request nothing external.

Needs the Debian packages ``chromium`` (and ``chromium-driver`` for other tools); install them with
``.ci/install_browser.sh``. Skipped when no Chromium is on PATH, failed instead under
``CAPSMED_REQUIRE_BROWSER=1`` (CI). The viewer tests drive Chromium over the DevTools protocol
(``cdp.py``) with WebGL2 in software (SwiftShader), so they need no GPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cdp import Browser
from matplotlib.image import imread

from tests.require import skip_or_fail

pytestmark = pytest.mark.browser

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


@pytest.fixture
def chromium() -> str:
    """The Chromium executable; skips (or fails under CAPSMED_REQUIRE_BROWSER=1) without one."""
    if CHROMIUM is None:
        skip_or_fail("BROWSER", "headless Chromium is not installed (run .ci/install_browser.sh)")
    return CHROMIUM


needs_chromium = pytest.mark.usefixtures("chromium")


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


# ----------------------------------------------------------------------------- the study viewer

READY = ("(() => { const s = document.getElementById('cv-viewer').getAttribute('data-state');"
         " return s === 'ready' || s.startsWith('error') ? s : null; })()")


def _canvas(br: Browser) -> np.ndarray:
    rect = br.evaluate("(() => { const c = document.getElementById('cv-canvas');"
                       " c.scrollIntoView(); const r = c.getBoundingClientRect();"
                       " return {x: r.x + window.scrollX, y: r.y + window.scrollY,"
                       " width: r.width, height: r.height}; })()")
    br.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return br.screenshot(clip=rect)[..., :3]


def _near(pixels: np.ndarray, colour: str, tol: float = 0.12) -> np.ndarray:
    """Pixels whose hue is that of ``colour`` (an overlay blended over grey keeps the hue)."""
    rgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    centred = pixels - pixels.mean(-1, keepdims=True)
    target = rgb - rgb.mean()
    norm = np.linalg.norm(centred, axis=-1)
    cos = (centred @ target) / (norm * np.linalg.norm(target) + 1e-9)
    return (norm > tol) & (cos > 0.95)


def _set(br: Browser, element_id: str, value: object, checked: bool | None = None) -> None:
    prop = f"e.checked = {str(checked).lower()};" if checked is not None else f"e.value = '{value}';"
    br.evaluate(f"(() => {{ const e = document.getElementById('{element_id}'); {prop}"
                " e.dispatchEvent(new Event('input', {bubbles: true})); })()")


@needs_chromium
def test_study_viewer_draws_scrolls_and_reads_out_offline(rendered, facts, tmp_path):
    """From a copied results folder: the overlay is drawn in the label colours, the scroller moves
    the slice, a click reads the voxel, and the page makes no network request."""
    from capsmed.report.figures import label_colour

    copy = tmp_path / "moved" / "results copy"
    shutil.copytree(rendered["root"], copy)
    original = rendered["studies"][(facts.SEG, "ucaps")]["case_005"]
    page = copy / original.relative_to(rendered["root"])
    netlog = tmp_path / "viewer.netlog.json"
    with Browser(CHROMIUM, tmp_path / "profile", netlog) as br:
        br.open(page.resolve().as_uri())
        assert br.wait_for(READY) == "ready", br.console()
        loaded = br.evaluate("Array.from(document.scripts).filter(s => s.src).map(s => s.src)")
        assert sorted(u.rsplit("/", 1)[1] for u in loaded) == ["capsmed-viewer.js",
                                                               "niivue.umd.js"]
        assert all(u.startswith(copy.resolve().as_uri()) for u in loaded), loaded
        br.evaluate("document.querySelector('#cv-views [data-view=axial]').click()")
        _set(br, "cv-slice", 6)
        first = _canvas(br)
        anterior = _near(first, label_colour(1))
        assert anterior.mean() > 0.01, "no pixels in the colour of the first label"
        _set(br, "cv-layer-on-1", None, checked=False)  # prediction layer off: the colour goes
        assert _near(_canvas(br), label_colour(1)).mean() < anterior.mean() / 10
        _set(br, "cv-layer-on-1", None, checked=True)
        _set(br, "cv-label-on-1", None, checked=False)  # label 1 off, the others stay
        assert _near(_canvas(br), label_colour(1)).mean() < anterior.mean() / 10
        _set(br, "cv-label-on-1", None, checked=True)
        _set(br, "cv-slice", 1)
        moved = _canvas(br)
        assert br.evaluate("document.getElementById('cv-slice-text').textContent") == "2 / 12"
        assert np.abs(moved - first).mean() > 0.01, "moving the slice did not change the view"
        rect = br.evaluate("(() => { const r = document.getElementById('cv-canvas')"
                           ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")
        br.click(rect[0] + rect[2] / 2, rect[1] + rect[3] / 2)
        readout = br.wait_for("(() => { const t = document.getElementById('cv-readout')"
                              ".textContent; return t.includes('Prediction:') ? t : null; })()")
        assert "Image:" in readout and "voxel (" in readout
        assert re.search(r"Capsules: anterior: (under 0\.10|[01]\.\d\d)( |$)", readout), readout
        names = br.evaluate("JSON.parse(document.getElementById('cv-data').textContent)"
                            ".volumes.map(v => v.name)")
        capsules = names.index("Capsules: anterior")  # evidence layers start hidden
        _set(br, "cv-slice", 6)
        before = _canvas(br)
        _set(br, f"cv-layer-on-{capsules}", None, checked=True)
        shown = _canvas(br)
        assert np.abs(shown - before).mean() > 0.005, "the capsule evidence layer drew nothing"
        _set(br, f"cv-layer-on-{capsules}", None, checked=False)
        assert np.abs(_canvas(br) - before).mean() < 0.001
        br.evaluate("document.querySelector('#cv-views [data-view=render]').click()")
        render = _canvas(br)
        assert render.std() > 0.02 and np.abs(render - before).mean() > 0.01, "no 3D render"
    requests = _page_requests(netlog)
    assert requests == [], [r["url"] for r in requests]


@needs_chromium
def test_study_page_policy_runs_only_the_viewer_scripts(rendered, facts, tmp_path):
    """The page's Content-Security-Policy blocks an injected inline or remote script."""
    copy = tmp_path / "results"
    shutil.copytree(rendered["root"], copy)
    page = copy / rendered["studies"][(facts.SEG, "ucaps")]["case_005"].relative_to(
        rendered["root"])
    html = page.read_text(encoding="utf-8")
    page.write_text(html.replace("</main>", "<script>document.title = 'injected';</script>"
                                 '<script src="http://example.invalid/x.js"></script></main>'),
                    encoding="utf-8")
    netlog = tmp_path / "csp.netlog.json"
    with Browser(CHROMIUM, tmp_path / "profile", netlog) as br:
        br.open(page.resolve().as_uri())
        assert br.wait_for(READY) == "ready"
        assert br.evaluate("document.title") == "Study case_005"
        blocked = [m for m in br.console() if "Content Security Policy" in m]
        assert len(blocked) >= 2, br.console()
    assert _page_requests(netlog) == []


# ----------------------------------------------------------------------------- generalisation


@needs_chromium
@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_generalisation_page_renders_every_figure_offline(generalisation_runs, task, tmp_path):
    """The page from real tiny runs: every figure decodes, nothing logs an error or loads."""
    page = generalisation_runs[task][2]
    # metric (and ECE) against severity, one gallery figure per shift, the learning curve
    expected = {"segmentation": 1 + 2, "classification": 2 + 2 + 1}[task]
    netlog = tmp_path / "generalisation.netlog.json"
    with Browser(CHROMIUM, tmp_path / "profile", netlog) as br:
        br.open(page.resolve().as_uri())
        sizes = br.wait_for("(() => { const im = Array.from(document.images);"
                            " return im.every(i => i.complete)"
                            " ? im.map(i => [i.naturalWidth, i.naturalHeight]) : null; })()")
        assert len(sizes) == expected and all(w > 100 and h > 100 for w, h in sizes), sizes
        ids = br.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
        assert {"severity", "corruption-error", "paired", "gallery", "cost"} <= set(ids)
        br.evaluate("document.getElementById('gallery').scrollIntoView()")
        _assert_drawn(br.screenshot())
        assert br.console() == []
    assert _page_requests(netlog) == []
