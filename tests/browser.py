"""Real-browser checks: headless Debian Chromium driven by Playwright, fully offline.

    def test_page(browser_page, tmp_path):          # fixture from tests/conftest.py
        page = browser_page.open_file(tmp_path / "report.html")
        assert browser_page.wait_for_figures(3) >= 3
        browser_page.screenshot("report")
        browser_page.assert_clean()                 # no console error, page error or external request

The browser is the system's ``/usr/bin/chromium`` (``apt-get install chromium``; ``.ci/run``
installs it); Playwright never downloads one. A missing browser fails the test (it does not
skip). Every request that leaves 127.0.0.1 / file: / data: / blob: is aborted and recorded, so a
page that needs a CDN fails ``assert_clean``. Screenshots go to ``$VITLENS_ARTIFACTS`` or else
``<pytest basetemp>/artifacts``.

:func:`serve_directory` serves static files and :func:`jupyter_lab` runs a JupyterLab server, both
on 127.0.0.1 at a free port.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
from jupyter_client import BlockingKernelClient
from playwright.sync_api import TimeoutError as PlaywrightTimeout

CHROMIUM = Path(os.environ.get("VITLENS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
LOCAL_HOSTS = ("127.0.0.1", "localhost")
LOCAL_SCHEMES = ("file", "data", "blob", "about")
CHECKOUT = Path(__file__).resolve().parents[1]

# Counts plotly figures that finished drawing (data bound, an SVG drawn, and every trace layer present).
_RENDERED_PLOTLY = """(selector) => Array.from(document.querySelectorAll(selector)).filter(
    (el) => el._fullData && el._fullData.length > 0 && el.querySelector('svg.main-svg')
).length"""


def launch_chromium(playwright):
    """Launch the system Chromium headless; fail (not skip) when it is not installed."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium chromium-driver` "
            "(.ci/run does) or point VITLENS_CHROMIUM at a Chromium binary"
        )
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True)


def _is_local(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in LOCAL_SCHEMES or parsed.hostname in LOCAL_HOSTS


@dataclass
class BrowserPage:
    """One Playwright page plus everything it logged.

    Attributes:
        page: the Playwright ``Page`` (use it directly for clicks, ``evaluate``, ``wait_for_selector``).
        artifacts: folder for screenshots.
        console_errors: console messages of type "error" (text and source location).
        page_errors: uncaught exceptions in the page.
        external_requests: URLs of requests that left the machine (aborted).
    """

    page: object
    artifacts: Path
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        self.page.route("**/*", self._route)

    def _on_console(self, message) -> None:
        if message.type == "error":
            location = message.location or {}
            self.console_errors.append(f"{message.text} ({location.get('url', '')}:{location.get('lineNumber', '')})")

    def _route(self, route) -> None:
        if _is_local(route.request.url):
            route.continue_()
        else:
            self.external_requests.append(route.request.url)
            route.abort()

    def goto(self, url: str, *, timeout: float = 30.0):
        """Open ``url`` and wait for its load event; returns the Playwright page."""
        self.page.goto(url, wait_until="load", timeout=timeout * 1000)
        return self.page

    def open_file(self, path: str | Path, *, timeout: float = 30.0):
        """Open a local HTML file (``file://``); returns the Playwright page."""
        return self.goto(Path(path).resolve().as_uri(), timeout=timeout)

    def wait_for_figures(self, count: int = 1, *, selector: str = ".js-plotly-plot", timeout: float = 30.0) -> int:
        """Wait until at least ``count`` plotly figures rendered; return how many did.

        Fails with the page's errors when they do not render within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            rendered = self.page.evaluate(_RENDERED_PLOTLY, selector)
            if rendered >= count:
                return rendered
            if time.monotonic() > deadline:
                path = self.screenshot("figures-timeout")
                pytest.fail(
                    f"{rendered} of {count} plotly figures ({selector!r}) rendered within {timeout} s; "
                    f"page errors {self.page_errors}, console errors {self.console_errors}, screenshot {path}"
                )
            self.page.wait_for_timeout(100)

    def screenshot(self, name: str, *, full_page: bool = True) -> Path:
        """Save a PNG screenshot as ``<artifacts>/<name>.png`` and return its path."""
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def assert_clean(self, *, ignore_console: Sequence[str] = (), ignore_page: Sequence[str] = ()) -> None:
        """No page error, no external request, and no console error, except those matching a
        regular expression in ``ignore_page`` / ``ignore_console``."""
        console = [text for text in self.console_errors if not any(re.search(p, text) for p in ignore_console)]
        page_errors = [text for text in self.page_errors if not any(re.search(p, text) for p in ignore_page)]
        assert not page_errors, f"page errors: {page_errors}"
        assert not console, f"console errors: {console}"
        assert not self.external_requests, f"requests left the machine: {self.external_requests}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_directory(root: str | Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 at a free port; yields the base URL (ends with "/")."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@dataclass(frozen=True)
class JupyterServer:
    """A running JupyterLab server: ``url`` ends with "/", ``token`` authenticates API calls,
    ``runtime_dir`` holds the kernels' connection files."""

    url: str
    token: str
    root: Path
    runtime_dir: Path

    def lab_url(self, notebook: str) -> str:
        """URL that opens ``notebook`` (relative to ``root``) in JupyterLab."""
        return f"{self.url}lab/tree/{notebook}?token={self.token}"

    def api(self, path: str, body: dict | None = None, *, method: str | None = None) -> dict:
        """Call the server's REST API (``path`` below ``api/``); returns the decoded JSON answer."""
        request = urllib.request.Request(
            f"{self.url}api/{path}", method=method or ("POST" if body is not None else "GET"),
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def start_kernel(self, notebook: str, *, timeout: float = 60.0) -> str:
        """Start ``notebook``'s session (kernel "python3") and wait until its kernel answers;
        returns the kernel id.

        Why: JupyterLab 4 opening a notebook starts a session of its own (under a temporary path,
        then renamed) and then attaches to the session the server holds at that path. Were that its
        own kernel, still starting, it closes the first websocket while the server waits for the
        kernel (the server's 500) and connects again to the same kernel, by a second connection
        with ``handleComms`` false (the first one held the comms): every comm_open is dropped and
        widgets stay at "Loading widget..." or show "model not found" (3 of 4 runs here). Attached
        to this kernel, already answering, its connection is the kernel's first.
        """
        session = self.api("sessions", {"path": notebook, "name": notebook, "type": "notebook", "kernel": {"name": "python3"}})
        kernel = session["kernel"]["id"]
        # answering kernel_info requests: started (the server's own execution_state ignores them)
        client = BlockingKernelClient(connection_file=str(self.runtime_dir / f"kernel-{kernel}.json"))
        client.load_connection_file()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=timeout)
        except RuntimeError as error:
            pytest.fail(f"the kernel of {notebook} did not start within {timeout} s ({error}); see the server log")
        finally:
            client.stop_channels()
        return kernel

    def run_notebook(self, browser_page: BrowserPage, notebook: str, *, timeout: float = 120.0):
        """Start ``notebook``'s kernel (:meth:`start_kernel`), open it in JupyterLab, run all cells
        and wait until every code cell ran (its prompt shows a number). Returns the Playwright page.

        Should a kernel connection still drop and lose the request (jupyter_server answers a
        websocket closed while connecting with a 500), "Run All Cells" is repeated until a cell is
        queued ("[*]") or ran.
        """
        self.start_kernel(notebook, timeout=timeout)
        page = browser_page.goto(self.lab_url(notebook), timeout=timeout)
        page.wait_for_selector(".jp-Notebook", timeout=timeout * 1000)
        page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=timeout * 1000)
        prompts = "Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))"
        deadline = time.monotonic() + timeout
        while True:
            page.click('.lm-MenuBar-itemLabel:text-is("Run")')
            page.click('.lm-Menu-itemLabel:text-is("Run All Cells")')
            try:
                page.wait_for_function(
                    f"() => {prompts}.some((p) => /\\[(\\*|\\d+)\\]/.test(p.textContent))", timeout=5000
                )
                break
            except PlaywrightTimeout:
                if time.monotonic() > deadline:
                    raise
        page.wait_for_function(
            f"() => {prompts}.every((p) => /\\[\\d+\\]/.test(p.textContent))",
            timeout=max(deadline - time.monotonic(), 1) * 1000,
        )
        return page


_LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false"},
    "@jupyterlab/notebook-extension/tracker": {"autoStartDefaultKernel": True},
}


@contextlib.contextmanager
def jupyter_lab(root: str | Path, home: str | Path, *, timeout: float = 60.0) -> Iterator[JupyterServer]:
    """Run JupyterLab on 127.0.0.1 at a free port, serving ``root``, with config, data and runtime
    folders under ``home`` (nothing from the user's own Jupyter setup), no browser launched.

    Yields a :class:`JupyterServer` once the server answers; stops the server afterwards.
    """
    root, home = Path(root), Path(home)
    for name in ("config", "data", "runtime", "ipython", "workspaces"):
        (home / name).mkdir(parents=True, exist_ok=True)
    # no debugger (it races the first kernel connection), nothing fetched from the internet
    (home / "config" / "labconfig").mkdir(parents=True, exist_ok=True)
    (home / "config" / "labconfig" / "page_config.json").write_text(json.dumps({
        "disabledExtensions": {"@jupyterlab/debugger-extension": True},
    }))
    # no "get notified about Jupyter news?" toast, no "select kernel" dialog over the page
    for plugin, settings in _LAB_SETTINGS.items():
        path = home / "settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    port, token = free_port(), "vitlens-test-token"
    env = os.environ | {
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "IPYTHONDIR": str(home / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    # the kernel spec of this interpreter, so the notebook's kernel is the test's Python
    subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--prefix", str(home / "data" / "prefix"), "--name", "python3"],
        env=env, check=True, capture_output=True,
    )
    env["JUPYTER_PATH"] = str(home / "data" / "prefix" / "share" / "jupyter")
    # kernels import this checkout's vitlens_patch (not whichever one is pip-installed)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    log = (home / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
            "--ServerApp.port_retries=0", "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
            "--ServerApp.terminals_enabled=False", "--allow-root",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with {process.returncode}:\n{(home / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}api/status?token={token}", timeout=2) as response:
                    json.load(response)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {timeout} s:\n{(home / 'server.log').read_text()}")
                time.sleep(0.3)
        yield JupyterServer(url, token, root, home / "runtime")
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
