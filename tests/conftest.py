"""Shared fixtures. Everything runs on CPU, offline, on the built-in tiny model."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

# Offline, quiet, and one shared tiny-model cache for the whole session (built once, ~5 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("SDSTUDIO_CACHE", str(ROOT / ".pytest_cache" / "sdstudio-cache"))
# One CPU thread for torch, here and in every subprocess a test starts: the tiny model gains nothing from a second
# thread, OpenMP's spinning threads crawl on a shared 2-core box, and the exact-resume tests compare losses bit
# for bit, which a thread count that changes between two runs (MKL/OpenMP adapt to load) would break.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)  # in case torch was imported before this file set the variables


def pytest_collection_modifyitems(config, items):
    """The longest tests first (browser, then slow-marked), the rest in collection order: with `pytest -n`, the
    workers then end on short tests together, instead of one starting a two-minute browser test while the others
    sit idle (alphabetically, test_train_browser and test_wizard_browser came last)."""
    def weight(item) -> int:
        return 0 if item.get_closest_marker("browser") else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=weight)  # a stable sort: each group keeps collection order


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The cached tiny model folder (diffusers layout)."""
    from sdstudio.models.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_components(tiny_dir):
    """A loaded tiny base. Session-wide and read-only: a test that mutates weights loads its own."""
    from sdstudio.models.loading import load_base

    return load_base("tiny")


@pytest.fixture(scope="session")
def sd15_full(tmp_path_factory) -> Path:
    """The full-size SD 1.5 with random weights (models/full.py), for the gpu tests: the folder
    scripts/gpu_check.sh built ($SDSTUDIO_BENCH_MODELS/sd15), else one built here on the GPU in fp16."""
    ready = Path(os.environ.get("SDSTUDIO_BENCH_MODELS", "/nonexistent")) / "sd15"
    if (ready / "model_index.json").is_file():
        return ready
    import torch

    from sdstudio.models.full import write_full_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return write_full_model(tmp_path_factory.mktemp("sd15-full") / "sd15", "sd15", device=device,
                            dtype=torch.float16 if device == "cuda" else torch.float32)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (use with pytest.mark.usefixtures): on a shared 2-core box, OpenMP's
    spinning threads make tiny-model steps 40x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def workspace(tmp_path):
    from sdstudio.workspace import Workspace

    return Workspace.open(tmp_path / "ws")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


class AppServer:
    def __init__(self, home: Path, extra_args: list[str] | None = None) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / f"app-{self.port}.log"
        env = dict(os.environ, SDSTUDIO_HOME=str(home), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), "--home", str(home), "--no-browser",
             *(extra_args or [])],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        try:
            self._wait()
        except BaseException:
            self.stop()  # a server that never answered must not outlive the test (and load the machine)
            raise

    def _wait(self, timeout: float = 120) -> None:
        import urllib.request

        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited early:\n{self.log.read_text()}")
            # Gradio checks that its own page answers within 3 s before launch returns (and exits when it does
            # not); our requests during that check slow it down on a busy machine. Wait for launch to finish.
            if "public link" not in self.log.read_text(errors="replace"):
                time.sleep(0.3)
                continue
            try:
                urllib.request.urlopen(self.url, timeout=15)  # a loaded 2-core box renders the page slowly
                return
            except Exception:
                time.sleep(0.3)
        raise RuntimeError(f"app did not answer in {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def app_server(tmp_path, tiny_dir):
    """The real app, started as a user would (python app.py), on a free port with a fresh workspace."""
    server = AppServer(tmp_path / "ws")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by playwright (never `playwright install`: it cannot download here)."""
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()


class ConsoleErrors(list):
    """Every error the page logs (console.error and uncaught exceptions). `reload()` reloads the page and drops
    only what the old page logs while it is torn down: its open event stream is aborted by the navigation
    ("BodyStreamBuffer was aborted", then Gradio's "Connection errored out", or a fetch's AbortError that may
    report a moment after the new page has loaded), which is the browser leaving the page, not an app error."""

    UNLOAD = ("BodyStreamBuffer was aborted", "Connection errored out", "AbortError: signal is aborted without reason")
    SETTLE_S = 3.0  # the old page's aborted fetches may report just after the new page has loaded

    def __init__(self, page) -> None:
        super().__init__()
        self.page = page
        self.navigating = False
        self.settled_at = 0.0
        page.on("console", lambda m: self._add(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self._add(f"uncaught: {e}"))

    def _add(self, text: str) -> None:
        if (self.navigating or time.time() < self.settled_at) and any(u in text for u in self.UNLOAD):
            return
        self.append(text)

    def reload(self, **kwargs) -> None:
        self.navigating = True
        try:
            self.page.reload(**kwargs)
        finally:
            self.navigating = False
            self.settled_at = time.time() + self.SETTLE_S


@pytest.fixture
def console_errors(page) -> ConsoleErrors:
    return ConsoleErrors(page)


def screenshot(page, name: str) -> Path:
    """Save a screenshot under test-artifacts/ (the README uses the ones in docs/screenshots/)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
