"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (no extra packages).

Chromium reads commands from file descriptor 3 and writes replies and events to descriptor 4, one
JSON message per NUL-terminated record. :class:`Browser` starts headless Chromium that way, opens one
page and offers the few calls the report tests need: navigate, evaluate JavaScript, take a screenshot,
send mouse and keyboard input, and read the console.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.image import imread

#: WebGL2 in software (SwiftShader through ANGLE), so a headless machine without a GPU draws.
WEBGL_FLAGS = ["--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
               "--ignore-gpu-blocklist"]


class CdpError(RuntimeError):
    """Chromium answered a command with an error, closed the pipe, or did not answer in time."""


class Browser:
    """Headless Chromium driven over a pipe; use as a context manager.

    Args:
        chromium: The Chromium executable.
        profile: An empty folder for the browser profile.
        netlog: Where Chromium writes its network log (read by the request check).
        size: Window size in CSS pixels.
    """

    def __init__(self, chromium: str, profile: Path, netlog: Path,
                 size: tuple[int, int] = (1200, 900)) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        args = [chromium, "--headless", "--no-sandbox", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic", "--disable-extensions", f"--user-data-dir={profile}",
                "--host-resolver-rules=MAP * ~NOTFOUND", f"--log-net-log={netlog}",
                f"--window-size={size[0]},{size[1]}", "--remote-debugging-pipe", *WEBGL_FLAGS,
                "about:blank"]
        shell = f"exec {shlex.join(args)} 3<&{to_child_r} 4>&{from_child_w}"
        self._proc = subprocess.Popen(["bash", "-c", shell], pass_fds=(to_child_r, from_child_w),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)
        attached = self.call("Target.attachToTarget",
                             {"targetId": target["targetId"], "flatten": True}, browser=True)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ask Chromium to quit and wait for it (so the network log is complete)."""
        if self._proc.poll() is None:
            try:
                self._send({"id": -1, "method": "Browser.close"})
            except OSError:
                pass
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ protocol

    def _send(self, message: dict[str, Any]) -> None:
        os.write(self._to_child, json.dumps(message).encode() + b"\0")

    def _read(self, timeout: float) -> dict[str, Any] | None:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._from_child], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise CdpError(f"Chromium closed the pipe: {err[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False,
             timeout: float = 60.0) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not browser:
            message["sessionId"] = self.session
        self._send(message)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            msg = self._read(max(left, 0.0)) if left > 0 else None
            if msg is None:
                raise CdpError(f"no answer to {method} within {timeout:.0f} s")
            if msg.get("id") == self._next_id:
                if "error" in msg:
                    raise CdpError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first event ``method`` (already received or arriving within ``timeout`` s)."""
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._read(max(deadline - time.monotonic(), 0.0))
            if msg is None:
                break
            if msg.get("method") == method:
                return msg
            if "method" in msg:
                self.events.append(msg)
        raise CdpError(f"no {method} event within {timeout:.0f} s")

    # ------------------------------------------------------------------ page helpers

    def open(self, url: str, timeout: float = 60.0) -> None:
        """Navigate and wait for the load event."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired", timeout)

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """Evaluate JavaScript in the page (promises awaited) and return its JSON value."""
        res = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in res:
            raise CdpError(f"JavaScript error: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise CdpError(f"{expression!r} still false after {timeout:.0f} s; "
                       f"console: {self.console()[-10:]}")

    def screenshot(self, clip: dict[str, float] | None = None) -> np.ndarray:
        """The page (or the CSS-pixel rectangle ``clip``: x, y, width, height) as RGB(A) floats."""
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", params)["data"]
        return imread(io.BytesIO(base64.b64decode(data)), format="png")

    def click(self, x: float, y: float) -> None:
        """A left click at page coordinates (CSS pixels)."""
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                   "button": "left", "clickCount": 1})

    def console(self) -> list[str]:
        """Console messages and uncaught exceptions seen so far, as text."""
        out = []
        for ev in self.events:
            p = ev.get("params", {})
            if ev.get("method") == "Runtime.consoleAPICalled":
                out.append(" ".join(str(a.get("value", a.get("description", "")))
                                    for a in p.get("args", [])))
            elif ev.get("method") == "Runtime.exceptionThrown":
                out.append(str(p.get("exceptionDetails", {}).get("exception", {}).get(
                    "description", p)))
            elif ev.get("method") == "Log.entryAdded":
                out.append(str(p.get("entry", {}).get("text", "")))
        return out
