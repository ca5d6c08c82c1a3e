"""Driving ``python -m sm_eval.viewer`` in headless Chromium (Debian's ``chromium``, through
Playwright with the system browser as its executable): start the server, load a pair, click a
source point, read what the page shows, and time a click's round trip beside the framework's own
no-op round trip. Used by tests/test_viewer_browser.py and benchmarks/bench_viewer.py."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

CHROMIUM_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
)  # fmt: skip
"""Chromium's flags: headless as root, and no connection of its own to anything (the machine's
network is closed; without these it keeps trying)."""
LAST_MATCH = re.compile(
    r"point (\d+): source \((-?[\d.]+), (-?[\d.]+)\) -> target \((-?[\d.]+), (-?[\d.]+)\), score (-?[\d.]+)"
)


def find_chromium() -> str | None:
    """The system Chromium: ``$CHROMIUM`` when set, else ``chromium`` or ``chromium-browser`` on the PATH."""
    candidates = [os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_viewer(args: Sequence[str], port: int, log: Path, timeout: float = 180.0) -> Iterator[subprocess.Popen]:
    """``python -m sm_eval.viewer ARGS --port PORT`` in its own process (output to ``log``), once it
    answers HTTP on 127.0.0.1; stopped afterwards."""
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "sm_eval.viewer", *args, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the viewer did not start on port {port}:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield server
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


class ViewerPage:
    """A Playwright page on the viewer, with the steps the tests take."""

    def __init__(self, page, url: str) -> None:
        self.page = page
        self.url = url

    def open(self) -> None:
        self.page.goto(self.url)
        self.page.wait_for_selector("#load-pair")

    # ---- Match tab -----------------------------------------------------------------------------

    def status(self, element: str) -> str:
        """The text of a status line (``#match-status``, ``#eval-status``), without Gradio's progress note."""
        return self.page.evaluate(STATUS_JS, element)

    def wait_status(self, element: str, text: str, timeout: float = 60.0) -> str:
        """The status line ``element`` once it holds ``text``."""
        self.page.wait_for_function(
            f"([s, t]) => ({STATUS_JS})(s).includes(t)", arg=[element, text], timeout=timeout * 1e3
        )
        return self.status(element)

    def match_status(self) -> str:
        return self.status("#match-status")

    def wait_match_status(self, text: str, timeout: float = 60.0) -> str:
        return self.wait_status("#match-status", text, timeout)

    def load_pair(self, source: str | None = None, target: str | None = None, upload: str | None = None) -> str:
        """Give the source by path (or ``upload`` a file as the source) and the target by path, then
        load the pair; returns the status once it says ``Loaded``."""
        if upload is not None:
            self.upload_source(upload)
        if source is not None:
            self.page.fill("#source-path :is(input, textarea)", source)
        if target is not None:
            self.page.fill("#target-path :is(input, textarea)", target)
        self.page.click("#load-pair")
        return self.wait_match_status("Loaded")

    def upload_source(self, path: str) -> None:
        """Upload ``path`` as the source image (removing the one uploaded before, if any)."""
        if self.page.locator("#source-upload input[type=file]").count() == 0:
            self.page.locator("#source-upload button[aria-label='Clear']").first.dispatch_event("click")
        self.page.set_input_files("#source-upload input[type=file]", path)

    def last_match(self) -> str:
        return self.page.input_value("#last-match textarea")

    def wait_picture(self) -> None:
        self.page.wait_for_function(
            "() => { const i = document.querySelector('#match-view img'); "
            "return i && i.complete && i.naturalWidth > 0; }"
        )

    def source_client_point(self, x: int, y: int) -> tuple[int, int]:
        """The integer page position that Gradio reads as pixel ``(x, y)`` of the picture, whose left
        part is the displayed source image (Gradio rounds the position over the picture to the
        nearest pixel)."""
        self.wait_picture()
        box = self.page.evaluate(
            "() => { const i = document.querySelector('#match-view img'); const r = i.getBoundingClientRect(); "
            "return [r.left, r.top, r.width, r.height, i.naturalWidth, i.naturalHeight]; }"
        )
        left, top, width, height, natural_w, natural_h = box
        scale = min(width / natural_w, height / natural_h, 1)
        return (
            round(left + (width - natural_w * scale) / 2 + x * scale),
            round(top + (height - natural_h * scale) / 2 + y * scale),
        )

    def click_source(self, x: int, y: int, timeout: float = 60.0) -> tuple[float, float, float, float, float]:
        """Click pixel ``(x, y)`` of the displayed source (the picture's left part); returns what the
        page then shows of the new match: source x, y, target x, y, score."""
        before = self.last_match()
        self.page.mouse.click(*self.source_client_point(x, y))
        self.page.wait_for_function(
            "(b) => document.querySelector('#last-match textarea').value !== b", arg=before, timeout=timeout * 1e3
        )
        return parse_last_match(self.last_match())

    def table_rows(self, element: str) -> list[list[str]]:
        """The body cells of the Dataframe ``element`` (``#match-table``, ``#category-table``, ...)
        that are rendered (Gradio's table draws the rows in view: those that fit ``max_height``)."""
        return self.page.evaluate(TABLE_JS, element)

    def click_cell(self, element: str, row: int, column: int) -> None:
        self.page.click(f"{element} [role=gridcell][data-row='{row}'][data-col='{column}']")

    def round_trip_ms(self, kind: str, x: int = 0, y: int = 0, timeout_ms: float = 60_000) -> float:
        """One round trip timed inside the page (``performance.now``): ``"noop"`` clicks the hidden
        button whose handler does nothing and waits for its text to change; ``"click"`` clicks
        displayed source pixel ``(x, y)`` and waits until the last-match text has changed and the new
        picture has loaded."""
        if kind == "click":
            client = self.source_client_point(x, y)
        else:
            client = (0, 0)
        return self.page.evaluate(ROUND_TRIP_JS, {"kind": kind, "x": client[0], "y": client[1], "timeout": timeout_ms})

    # ---- Evaluation tab ------------------------------------------------------------------------

    def open_evaluation(self, folder: str, timeout: float = 120.0) -> str:
        """Open ``folder`` in the Evaluation tab; returns the status once it names the folder (opened,
        or an error)."""
        self.page.get_by_role("tab", name="Evaluation").click()
        self.page.fill("#eval-folder :is(input, textarea)", folder)
        self.page.click("#eval-open")
        return self.wait_status("#eval-status", folder, timeout)


STATUS_JS = """(s) => {
  const box = document.querySelector(s);
  const text = box.querySelector('[data-testid=markdown]');
  return (text || box).innerText.trim();
}"""

TABLE_JS = """
(s) => Array.from(document.querySelectorAll(s + ' [role=row].virtual-row'))
  .sort((a, b) => Number(a.dataset.index) - Number(b.dataset.index))
  .map(r => Array.from(r.querySelectorAll('[role=gridcell]'))
    .sort((a, b) => Number(a.dataset.col) - Number(b.dataset.col))
    .map(c => c.innerText.trim()))
"""

ROUND_TRIP_JS = """
async ({kind, x, y, timeout}) => {
  const started = performance.now();
  const until = (ready) => new Promise((resolve, reject) => {
    const check = () => {
      if (ready()) resolve(performance.now() - started);
      else if (performance.now() - started > timeout) reject(new Error('no answer in ' + timeout + ' ms'));
      else setTimeout(check, 0);
    };
    check();
  });
  if (kind === 'noop') {
    const out = document.querySelector('#noop-out textarea');
    const before = out.value;
    document.querySelector('#noop-button').click();
    return await until(() => out.value !== before);
  }
  const text = document.querySelector('#last-match textarea');
  const before = text.value;
  const img = document.querySelector('#match-view img');
  const source = img.src;
  img.dispatchEvent(new MouseEvent('click', {bubbles: true, cancelable: true, clientX: x, clientY: y, view: window}));
  return await until(() => {
    const image = document.querySelector('#match-view img');
    return text.value !== before && image && image.src !== source && image.complete && image.naturalWidth > 0;
  });
}
"""


def parse_last_match(text: str) -> tuple[float, float, float, float, float]:
    """``(source x, source y, target x, target y, score)`` of the last-match text."""
    found = LAST_MATCH.search(text)
    if not found:
        raise AssertionError(f"no match in the last-match text {text!r}")
    return tuple(float(v) for v in found.groups()[1:])  # type: ignore[return-value]


def handler_ms(status: str) -> float:
    """The click handler's own time, from the Match tab's status line."""
    found = re.search(r"[Hh]andled the click in ([\d.]+) ms", status)
    if not found:
        raise AssertionError(f"no handler time in {status!r}")
    return float(found.group(1))
