"""Real-browser tests of notebook widgets: a private JupyterLab driven by headless Chromium.

`open_notebook(path)` copies a notebook into a temporary folder, serves it with its own
JupyterLab (127.0.0.1, a free port, a random token, isolated config, data, runtime and
IPython dirs), opens it in Debian's Chromium through Playwright and yields a `NotebookPage`:

    with open_notebook(NOTEBOOKS / "browser_demo.ipynb") as nb:
        nb.run_all()
        before = nb.image_src(".vt-image")
        nb.press(".vt-layer-slider", "ArrowRight")
        nb.wait_for_image_change(".vt-image", before)
        nb.wait_for_text(".vt-state", "layer=1 ...")
        nb.assert_no_errors()

Controls are found by CSS selectors, best the classes a notebook gives its widgets with
`widget.add_class("vt-...")` (ipywidgets renders `_dom_classes` as DOM classes). Every
console error, page error, kernel traceback (widget callbacks' too), kernel stderr, error
output and status line reading "error..." (`.vt-status`, see STATUS_ERRORS) is collected,
and a wait fails as soon as a traceback or such a status line appears. On exit the browser,
the server and its kernels are stopped, and nothing is left running.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psutil

# Without the networking flags Chromium keeps dialling Google's services, which the closed
# network refuses; as root it only starts without its sandbox.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# User settings written into the private JupyterLab: no news prompt and no update check (both
# ask the internet), and every cell kept in the DOM (windowing would detach off-screen ones).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                     "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}

# Status lines that report a caught callback error: selector -> pattern of its text. The
# explorers never raise into the notebook: they write "error: ..." into `.vt-status`.
STATUS_ERRORS = {".vt-status": r"^error\b"}

# Where JupyterLab shows tracebacks and stderr, and where ipywidgets draws a widget.
STDERR_OUTPUT = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
WIDGET_OUTPUT = "[data-mime-type='application/vnd.jupyter.widget-view+json']"

# Runs in the page before JupyterLab's own scripts: finds the notebook panel and records the
# kernel's tracebacks and stderr, including those of widget callbacks, which JupyterLab shows
# in no cell (they answer a comm message, not an execution).
PAGE_HELPERS = """
window.__vt = {
  tracebacks: [],
  stderr: [],
  ran: null,
  watched: null,
  panel(path) {
    const app = window.jupyterapp;
    if (!app) return null;
    for (const w of app.shell.widgets('main')) {
      if (w.context && w.context.path === path && w.content && w.sessionContext) return w;
    }
    return null;
  },
  ready(path) {
    const panel = this.panel(path);
    const kernel = panel && panel.context.isReady && panel.sessionContext.session?.kernel;
    if (!kernel || kernel.status !== 'idle' || kernel.connectionStatus !== 'connected') {
      return false;
    }
    if (this.watched !== kernel) {
      this.watched = kernel;
      kernel.iopubMessage.connect((_, msg) => {
        const c = msg.content;
        if (msg.header.msg_type === 'error') {
          this.tracebacks.push(c.traceback.join('\\n') || `${c.ename}: ${c.evalue}`);
        } else if (msg.header.msg_type === 'stream' && c.name === 'stderr') {
          this.stderr.push(c.text);
        }
      });
    }
    return true;
  },
  runAll(path) {
    // Not awaited by Playwright (a hanging cell would hang the test): polled through `ran`.
    const app = window.jupyterapp;
    app.shell.activateById(this.panel(path).id);
    this.ran = null;
    // Saved outputs would pass for fresh ones, and saved widgets fail to display.
    app.commands.execute('notebook:clear-all-cell-outputs')
      .then(() => app.commands.execute('notebook:run-all-cells'))
      .then(ok => { this.ran = ok ? 'ok' : 'a cell failed'; },
            error => { this.ran = `run-all-cells failed: ${error}`; });
  },
  rendered(widgetOutput) {
    return [...document.querySelectorAll(widgetOutput)]
      .every(output => output.querySelector('.jupyter-widgets'));
  },
  dismiss() {
    // Clicked in JavaScript: a toast sliding in is never "stable" enough for Playwright.
    const buttons = document.querySelectorAll(
      '.jp-Dialog .jp-Dialog-button.jp-mod-accept, .jp-Notification-Toast-Close');
    const texts = [];
    for (const button of buttons) {
      if (button.dataset.vtDismissed) continue;
      button.dataset.vtDismissed = 'yes';
      texts.push((button.closest('.jp-Dialog, .Toastify__toast') || button).innerText.trim());
      button.click();
    }
    return texts;
  },
  executed(path) {
    const panel = this.panel(path);
    const kernel = panel.sessionContext.session?.kernel;
    const cells = panel.content.widgets.filter(cell => cell.model.type === 'code');
    return kernel?.status === 'idle'
      && cells.every(cell => cell.model.executionCount !== null);
  },
};
"""


def find_chromium() -> str | None:
    """Debian's Chromium (Playwright's own browser download is impossible offline)."""
    for path in ("/usr/bin/chromium", shutil.which("chromium")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    for package in ("playwright", "jupyterlab"):
        if importlib.util.find_spec(package) is None:
            return f"the {package} package is missing: pip install -e '.[dev]'"
    if find_chromium() is None:
        return "Chromium is missing (/usr/bin/chromium): apt-get install chromium"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class JupyterLab:
    """A private JupyterLab server on 127.0.0.1 serving `home/work`; a context manager.

    Everything it writes (config, user settings, workspaces, runtime files, the IPython
    profile, its log) stays under `home`. `processes` holds the server and every process it
    started (kernels), as seen when it was stopped: `survivors()` checks none outlived it.
    """

    def __init__(self, home: Path, *, timeout: float = 60.0):
        self.home = Path(home)
        self.root = self.home / "work"
        self.timeout = timeout
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log_path = self.home / "jupyter.log"
        self.proc: subprocess.Popen | None = None
        self.processes: list[psutil.Process] = []

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _environment(self) -> dict[str, str]:
        jupyter = self.home / "jupyter"
        settings = jupyter / "config" / "lab" / "user-settings"
        for plugin, values in LAB_SETTINGS.items():
            path = settings / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        bin_dir = str(Path(sys.executable).parent)  # kernels run this interpreter
        return dict(
            os.environ,
            JUPYTER_CONFIG_DIR=str(jupyter / "config"),
            JUPYTER_DATA_DIR=str(jupyter / "data"),
            JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(jupyter / "workspaces"),
            IPYTHONDIR=str(self.home / "ipython"),
            MPLBACKEND="Agg",
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
        )

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",  # fail rather than serve on another port
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements."
            "NeverCheckForUpdate",
        ]
        if os.geteuid() == 0:
            command.append("--allow-root")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=self.root, env=self._environment(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + self.timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"JupyterLab did not answer on port {self.port} within "
                                   f"{self.timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def _request(self, path: str, method: str = "GET") -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/{path}", method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status

    def _answers(self) -> bool:
        try:
            return self._request("api/status") == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def descendants(self) -> list[psutil.Process]:
        """The processes the server started and that still run: kernels, mostly."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except (AttributeError, psutil.NoSuchProcess):  # not started, or gone
            return []

    def stop(self) -> None:
        """Shut the server and its kernels down politely, then by force; leave no process."""
        if self.proc is None:
            return
        try:
            self.processes = [psutil.Process(self.proc.pid), *self.descendants()]
        except psutil.NoSuchProcess:  # exited and reaped already (it failed to start)
            self.processes = []
        if self.proc.poll() is None:
            try:
                self._request("api/shutdown", method="POST")  # also shuts the kernels down
                self.proc.wait(timeout=20)
            except (urllib.error.URLError, ConnectionError, TimeoutError,
                    subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        left = [p for p in self.processes if p.is_running() and p.pid != self.proc.pid]
        for p in left:
            p.terminate()
        _, left = psutil.wait_procs(left, timeout=5)
        for p in left:
            p.kill()
        psutil.wait_procs(left, timeout=5)
        self.proc = None

    def survivors(self) -> list[psutil.Process]:
        """The processes of this server that still run (zombies waiting for init excepted)."""
        alive = []
        for p in self.processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def __enter__(self) -> JupyterLab:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class NotebookPage:
    """One notebook open in JupyterLab in Chromium, with helpers to drive its widgets.

    `page` is the Playwright page, for anything the helpers do not cover. Waits raise
    AssertionError, with every error collected so far, at `timeout` seconds or as soon as
    the kernel sends a traceback or a status line reports an error.
    """

    def __init__(self, page, lab: JupyterLab, path: str, *, timeout: float = 60.0):
        self.page = page
        self.lab = lab
        self.path = path
        self.timeout = timeout
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.dismissed: list[str] = []  # texts of the dialogs and notifications closed
        self.status_errors = dict(STATUS_ERRORS)  # what counts as an error in a status line
        page.set_default_timeout(timeout * 1000)
        page.add_init_script(PAGE_HELPERS)
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def _on_console(self, message) -> None:
        if message.type == "error":
            where = message.location
            self.console_errors.append(f"{message.text} ({where.get('url')}:"
                                       f"{where.get('lineNumber')})")

    # -- opening and running ---------------------------------------------------------------

    def open(self) -> None:
        """Load JupyterLab on the notebook and wait until its kernel is idle."""
        self.page.goto(self.lab.url(f"lab/tree/{quote(self.path)}"))
        self.wait_until(lambda: self.page.evaluate("() => window.jupyterapp !== undefined"),
                   "JupyterLab to load (window.jupyterapp; expose_app_in_browser)",
                   fail_fast=False)
        self.wait_until(lambda: self._dismiss_dialogs() or self._js("ready"),
                   f"{self.path} to open with an idle kernel", fail_fast=False)

    def run_all(self, timeout: float | None = None) -> None:
        """Run every cell, wait until all have executed, then until every widget rendered."""
        self._js("runAll")
        ran = self.wait_until(lambda: self.page.evaluate("() => window.__vt.ran"),
                         f"every cell of {self.path} to execute", timeout=timeout)
        if ran != "ok":  # JupyterLab stops at the first failing cell
            raise AssertionError(f"{ran} in {self.path}\n" + self.error_report())
        self.wait_until(lambda: self._js("executed"), "the kernel to be idle", timeout=timeout)
        self.wait_until(lambda: self.page.evaluate("(s) => window.__vt.rendered(s)", WIDGET_OUTPUT),
                   "every widget output to render", timeout=timeout)
        self._dismiss_dialogs()

    def _js(self, helper: str):
        return self.page.evaluate(f"(path) => window.__vt.{helper}(path)", self.path)

    def _dismiss_dialogs(self) -> None:
        """Accept any dialog (the kernel choice...), hide any notification (the news prompt)
        and remember their texts in `dismissed`."""
        self.dismissed += self.page.evaluate("() => window.__vt.dismiss()")

    # -- waiting ---------------------------------------------------------------------------

    def wait_until(self, condition: Callable[[], object], what: str | Callable[[], str], *,
                   fail_fast: bool = True, timeout: float | None = None):
        """Poll `condition` until it is truthy and return it; with `fail_fast`, fail as soon
        as the kernel sends a traceback or a status line reports an error (not on stderr).

        `what` names what is awaited, in the error; a callable is asked only then.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            value = condition()
            if value:
                return value
            failed = fail_fast and (self.kernel_errors(stderr=False) or self.status_texts())
            if failed or time.monotonic() > deadline:
                what = what() if callable(what) else what
                why = "an error came" if failed else "timed out"
                raise AssertionError(f"{why} waiting for {what}\n" + self.error_report())
            time.sleep(0.1)

    def wait_for_text(self, selector: str, text: str, timeout: float | None = None) -> None:
        """Wait until the element's visible text is exactly `text`."""
        self.widget(selector)
        self.wait_until(lambda: self.text(selector) == text,
                   lambda: f"{selector} to read {text!r} (it reads {self.text(selector)!r})",
                   timeout=timeout)

    def wait_for_image_change(self, selector: str, previous: str,
                              timeout: float | None = None) -> str:
        """Wait until the image's src differs from `previous`; return the new src."""
        return self.wait_until(lambda: (src := self.image_src(selector)) != previous and src,
                          f"the image {selector} to change", timeout=timeout)

    # -- finding and driving widgets -------------------------------------------------------

    def widget(self, selector: str):
        """The Playwright locator of `selector`, once something matches it."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        locator = self.page.locator(selector)
        try:
            locator.first.wait_for(state="attached", timeout=self.timeout * 1000)
        except PlaywrightTimeout as error:
            classes = self.page.evaluate(
                "() => [...new Set([...document.querySelectorAll('[class*=vt-]')]"
                ".flatMap(e => [...e.classList].filter(c => c.startsWith('vt-'))))].sort()")
            raise AssertionError(f"nothing matches {selector!r}; the page's vt- classes: "
                                 f"{classes}\n" + self.error_report()) from error
        return locator

    def by_description(self, description: str):
        """The widget whose ipywidgets `description` is `description` (a label or a button)."""
        page = self.page
        labelled = page.locator(".jupyter-widgets").filter(
            has=page.locator(":scope > .widget-label", has_text=re.compile(
                f"^{re.escape(description)}$")))
        return labelled.or_(page.locator(".jupyter-button", has_text=re.compile(
            f"^{re.escape(description)}$")))

    def press(self, selector: str, key: str, times: int = 1) -> None:
        """Focus the control (a slider's handle, else its input) and press `key` `times`."""
        widget = self.widget(selector)
        # ipywidgets 8 sliders are noUiSlider, 7's jQuery UI
        inner = widget.locator(".noUi-handle, .ui-slider-handle, input, select, button, textarea")
        (inner.first if inner.count() else widget).focus()
        for _ in range(times):
            self.page.keyboard.press(key)

    def click(self, selector: str) -> None:
        self.widget(selector).click()

    def select(self, selector: str, label: str) -> None:
        """Pick the option `label` of a Dropdown (the `<select>` at or inside `selector`)."""
        widget = self.widget(selector)
        is_select = widget.evaluate("e => e.tagName === 'SELECT'")
        (widget if is_select else widget.locator("select")).select_option(label=label)

    def text(self, selector: str) -> str:
        return self.widget(selector).inner_text().strip()

    def image_src(self, selector: str) -> str:
        """The src of the `<img>` at or inside `selector` (a blob: or data: URL)."""
        src = self.widget(selector).evaluate(
            "e => (e.tagName === 'IMG' ? e : e.querySelector('img'))?.src || null")
        if src is None:
            raise AssertionError(f"no <img> at or inside {selector!r}")
        return src

    def image_bytes(self, selector: str) -> bytes:
        """The bytes the `<img>` at or inside `selector` shows (a PNG starts b'\\x89PNG')."""
        encoded = self.page.evaluate(
            """async (src) => {
                 const bytes = new Uint8Array(await (await fetch(src)).arrayBuffer());
                 let text = '';
                 for (const b of bytes) text += String.fromCharCode(b);
                 return btoa(text);
               }""",
            self.image_src(selector),
        )
        return base64.b64decode(encoded)

    # -- the kernel, directly -------------------------------------------------------------

    def kernel_eval(self, expression: str) -> str:
        """The text/plain of `expression` evaluated in the notebook's kernel (no cell added)."""
        reply = self._request_execute("", {"value": expression})
        result = reply["user_expressions"]["value"]
        if result["status"] != "ok":
            raise AssertionError(f"{expression!r} failed in the kernel: {result['ename']}: "
                                 f"{result['evalue']}")
        return result["data"]["text/plain"]

    def kernel_exec(self, code: str) -> None:
        """Run `code` in the notebook's kernel, outside any cell (to poke or break state)."""
        reply = self._request_execute(code, {})
        if reply["status"] != "ok":
            raise AssertionError(f"the kernel failed on {code!r}: {reply['ename']}: "
                                 f"{reply['evalue']}")

    def _request_execute(self, code: str, expressions: dict[str, str]) -> dict:
        return self.page.evaluate(
            """async ([path, code, expressions]) => {
                 const kernel = window.__vt.panel(path).sessionContext.session.kernel;
                 const future = kernel.requestExecute(
                   {code, silent: false, store_history: false, user_expressions: expressions});
                 return (await future.done).content;
               }""",
            [self.path, code, expressions],
        )

    # -- errors ----------------------------------------------------------------------------

    def kernel_errors(self, stderr: bool = True) -> list[str]:
        """The tracebacks (and stderr) the kernel sent, from cells and widget callbacks."""
        tracebacks, streams = self.page.evaluate(
            "() => window.__vt ? [window.__vt.tracebacks, window.__vt.stderr] : [[], []]")
        return [strip_ansi(e) for e in tracebacks] + (
            [f"stderr: {text}" for text in streams] if stderr else [])

    def output_errors(self) -> list[str]:
        """Error and stderr outputs shown in cells, and widgets that failed to display."""
        return self.page.evaluate(
            """([stderr, widget]) => [
                 ...[...document.querySelectorAll(stderr)].map(e => e.innerText),
                 ...[...document.querySelectorAll(widget)].map(e => e.innerText)
                   .filter(text => text.startsWith('Error displaying widget')),
               ]""",
            [STDERR_OUTPUT, WIDGET_OUTPUT],
        )

    def status_texts(self) -> list[str]:
        """The texts of status lines that report an error (see `status_errors`)."""
        texts = []
        for selector, pattern in self.status_errors.items():
            texts += [t for t in self.page.locator(selector).all_inner_texts()
                      if re.search(pattern, t.strip())]
        return texts

    def errors(self) -> list[str]:
        """Every error collected: console, page, kernel, cell outputs and status lines."""
        return ([f"console: {e}" for e in self.console_errors]
                + [f"page: {e}" for e in self.page_errors]
                + [f"kernel: {e}" for e in self.kernel_errors()]
                + [f"output: {e}" for e in self.output_errors()]
                + [f"status: {e}" for e in self.status_texts()])

    def clear_errors(self) -> None:
        """Forget the console, page and kernel errors so far (after provoking one on purpose);
        outputs and status lines are read afresh from the page each time."""
        self.console_errors.clear()
        self.page_errors.clear()
        self.page.evaluate("() => { window.__vt.tracebacks = []; window.__vt.stderr = []; }")

    def error_report(self) -> str:
        errors = self.errors()
        return ("errors so far:\n" + "\n".join(errors)) if errors else "no errors so far"

    def assert_no_errors(self) -> None:
        errors = self.errors()
        assert not errors, "errors reached the browser:\n" + "\n".join(errors)


@contextmanager
def open_notebook(notebook: Path, *, timeout: float = 60.0) -> Iterator[NotebookPage]:
    """Serve a copy of `notebook` with a private JupyterLab and open it in headless Chromium.

    Yields a NotebookPage whose kernel is idle and whose cells have not run yet (call
    `run_all`). On exit the browser, the server and its kernels are stopped.
    """
    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"no notebook at {notebook}")
    if reason := browser_missing():
        raise RuntimeError(reason)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="vt-browser-") as home:
        with JupyterLab(Path(home), timeout=timeout) as lab, sync_playwright() as playwright:
            shutil.copy(notebook, lab.root / notebook.name)
            browser = playwright.chromium.launch(
                executable_path=find_chromium(), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1600})
                nb = NotebookPage(page, lab, notebook.name, timeout=timeout)
                nb.open()
                yield nb
            finally:
                browser.close()
