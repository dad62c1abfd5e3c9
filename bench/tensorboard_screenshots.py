"""Screenshots of a run's TensorBoard dashboards, to check what a user sees there (and to keep one in the README).

    python bench/tensorboard_screenshots.py --logdir saved_models/demo/logs --output /tmp/tb-shots

Starts TensorBoard on a free port, waits until it lists runs, opens each dashboard in headless Chromium (driven
through its DevTools pipe: no Python package beyond TensorBoard needed), waits until the page has loaded its data,
saves a PNG per dashboard, stops TensorBoard and prints the file names. Needs Chromium on PATH (Debian:
`apt-get install chromium`). Chart lines are drawn as SVG (`forceSVG`): headless Chromium has no GPU for TensorBoard's
WebGL charts. The time-series settings pane is closed, to give the charts the width.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# (file name, address after http://127.0.0.1:<port>/, label of a checkbox to tick): what a user sees first, then each
# dashboard opened the way that shows this project's logs best (scalars unsmoothed, the Grad-CAM grid at its size).
DASHBOARDS = [
    ("timeseries.png", "?forceSVG=true#timeseries", None),
    ("timeseries_scalars.png", "?forceSVG=true&smoothing=0&tagFilter=epoch_#timeseries", None),
    ("scalars.png", "#scalars&_smoothingWeight=0&tagFilter=epoch_", None),
    ("images.png", "#images", None),
    ("images_gradcam.png", "#images&tagFilter=gradcam", "Show actual image size"),
    ("hparams.png", "#hparams", None),
]
# Clicks the checkboxes labelled LABEL, searching inside the shadow DOM of TensorBoard's Polymer dashboards too.
CLICK = """(function walk(root) {
  for (const e of root.querySelectorAll("*")) {
    if (/checkbox/.test(e.localName) && e.textContent.trim() === LABEL) e.click();
    if (e.shadowRoot) walk(e.shadowRoot);
  }
})(document)"""
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_tensorboard(logdir: Path, port: int, log, timeout: float = 180) -> subprocess.Popen:
    """TensorBoard on 127.0.0.1:port, its output into the file `log`, returned once it lists at least one run."""
    cmd = [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}", f"--port={port}", "--host=127.0.0.1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"TensorBoard exited ({proc.returncode}):\n{log.read().decode(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as reply:
                if json.load(reply):
                    return proc
        except OSError:
            pass
        time.sleep(1)
    proc.terminate()
    sys.exit(f"TensorBoard on port {port} listed no run of {logdir} within {timeout:.0f} s")


class Chromium:
    """Headless Chromium over --remote-debugging-pipe: JSON messages ending in NUL, read on fd 3, written on fd 4."""

    def __init__(self, binary: str, width: int, height: int):
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        # to_browser is the lowest of the four numbers and from_browser the highest (>= 6): the dup2 below cannot
        # overwrite each other's source.

        def map_fds() -> None:  # in the child, before exec
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)
            os.set_inheritable(3, True)

        self._profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        flags = [*CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={self._profile.name}"]
        self.proc = subprocess.Popen(
            [binary, *flags, "about:blank"],
            close_fds=False,
            preexec_fn=map_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._last_id, self.events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _receive(self, timeout: float) -> dict | None:
        while b"\0" not in self._buffer:
            if not select.select([self._from_browser], [], [], timeout)[0]:
                return None
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe (it exited)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive(timeout=60)
            if reply is None:
                raise RuntimeError(f"Chromium did not answer {method} within 60 s")
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def load(self, url: str) -> None:
        self.call("Page.navigate", session=True, url="about:blank")
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_idle(url)

    def wait_idle(self, what: str, loaded: bool = False, quiet: float = 2.0, timeout: float = 60) -> None:
        """Return once the page has loaded and no request was under way for `quiet` seconds."""
        pending, idle_since = set(), time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events, self.events = self.events, []
            message = self._receive(timeout=0.2)
            for event in events + ([message] if message else []):
                method, params = event.get("method"), event.get("params", {})
                if method == "Page.loadEventFired":
                    loaded = True
                elif method == "Network.requestWillBeSent":
                    pending.add(params["requestId"])
                elif method in ("Network.loadingFinished", "Network.loadingFailed"):
                    pending.discard(params["requestId"])
                else:
                    continue
                idle_since = time.monotonic()
            if loaded and not pending and time.monotonic() - idle_since >= quiet:
                return
        print(f"warning: {what} still loading after {timeout:.0f} s; screenshot taken anyway", file=sys.stderr)

    def tick(self, label: str) -> None:
        self.call("Runtime.evaluate", session=True, expression=CLICK.replace("LABEL", json.dumps(label)))
        self.wait_idle(f"click on {label!r}", loaded=True)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=30)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._profile.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, required=True, help="a run's logs/ folder, or a folder of runs")
    parser.add_argument("--output", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--size", default="1600x1400", help="page size in pixels, WIDTHxHEIGHT")
    args = parser.parse_args()

    binary = next(filter(None, map(shutil.which, BROWSERS)), None)
    if binary is None:
        sys.exit("Chromium is not on PATH: install it (Debian/Ubuntu: `apt-get install chromium`) and run again.")
    if not args.logdir.is_dir():
        sys.exit(f"--logdir {args.logdir} is not a folder")
    args.output.mkdir(parents=True, exist_ok=True)

    width, height = map(int, args.size.split("x"))
    port = free_port()
    with tempfile.TemporaryFile() as log:
        tensorboard = start_tensorboard(args.logdir.resolve(), port, log)
        browser = None
        try:
            browser = Chromium(binary, width, height)
            base = f"http://127.0.0.1:{port}/"
            # TensorBoard reads its settings from the origin's localStorage when a page opens: close the settings pane.
            browser.load(base + "#hparams")
            settings = json.dumps(json.dumps({"timeSeriesSettingsPaneOpened": False}))
            browser.call(
                "Runtime.evaluate", session=True, expression=f"localStorage['_tb_global_settings'] = {settings}"
            )
            for name, address, click in DASHBOARDS:
                browser.load(base + address)
                if click:
                    browser.tick(click)
                browser.screenshot(args.output / name)
                print(args.output / name)
        finally:
            try:
                if browser is not None:
                    browser.close()
            finally:
                tensorboard.terminate()
                tensorboard.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
