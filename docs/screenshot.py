"""Screenshot of a study report for the README, taken from a finished run's results folder.

    python docs/screenshot.py results docs/study_page.png [--model ucaps]

Opens the first test-study report of a segmentation model listed in ``results/summary.json`` in
headless Chromium (WebGL2 through SwiftShader, so no GPU is needed; no network), waits for the
viewer, and saves the page from its top to the end of the viewer. Needs Chromium
(``.ci/install_browser.sh``); uses the DevTools client of the report tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "report"))
from cdp import Browser  # noqa: E402

READY = ("(() => { const s = document.getElementById('cv-viewer').getAttribute('data-state');"
         " return s === 'ready' || s.startsWith('error') ? s : null; })()")


def study_page(results: Path, model: str | None) -> Path:
    """The first segmentation study report of ``model`` (or of the first such model)."""
    summary = json.loads((results / "summary.json").read_text())
    for ds in summary["datasets"].values():
        if ds.get("task") != "segmentation":
            continue
        for name, doc in ds["models"].items():
            if (model is None or name == model) and doc.get("studies"):
                return results / sorted(doc["studies"].values())[0]
    sys.exit(f"{results / 'summary.json'}: no segmentation study report"
             + (f" of model {model}" if model else ""))


def main() -> None:
    """Parse the arguments, open the page, write the PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                     if shutil.which(n)), None)
    if chromium is None:
        sys.exit("Chromium is not installed (run .ci/install_browser.sh)")
    page = study_page(args.results, args.model)
    with tempfile.TemporaryDirectory() as tmp, \
            Browser(chromium, Path(tmp) / "profile", Path(tmp) / "net.json",
                    size=(1200, 1000)) as br:
        br.open(page.resolve().as_uri())
        state = br.wait_for(READY)
        if state != "ready":
            sys.exit(f"{page}: the viewer did not start ({state})")
        bottom = br.evaluate("(() => { const r = document.getElementById('cv-viewer')"
                             ".getBoundingClientRect(); return r.bottom + scrollY + 12; })()")
        br.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        pixels = br.screenshot(clip={"x": 0, "y": 0, "width": 1200, "height": bottom})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(args.out, pixels)
    print(f"{page} -> {args.out}")


if __name__ == "__main__":
    main()
