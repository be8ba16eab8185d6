"""Shared fixtures: isolated caches and run folders, tiny generated datasets, the shared data."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras reads KERAS_HOME once, at import, so the whole test session shares one empty,
# temporary Keras home; tests that need weights copy them in and take them out again.
SESSION_KERAS_HOME = Path(tempfile.mkdtemp(prefix="keras_home_"))
os.environ["KERAS_HOME"] = str(SESSION_KERAS_HOME)
atexit.register(shutil.rmtree, SESSION_KERAS_HOME, True)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Debian's Chromium, which Playwright drives in the browser tests (it downloads no browser).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless in a container: no sandbox, no GPU, nothing fetched in the background.
CHROMIUM_ARGUMENTS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                      "--disable-sync", "--no-first-run", "--disable-quic")
SHARED = REPO_ROOT.parent / "shared"
# Colours far apart, so a model learns the classes in a few steps even from random weights.
CLASS_COLOURS = {"cats": (220, 40, 40), "dogs": (40, 60, 220), "birds": (40, 200, 60)}


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Every test gets its own cache and runs root, an empty Keras home, and no network."""
    base = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("TRANSFER_STUDIO_CACHE", str(base / "cache"))
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(base / "runs"))
    monkeypatch.setenv("TRANSFER_STUDIO_OFFLINE", "1")
    monkeypatch.delenv("TRANSFER_STUDIO_REQUIRE_SIGNIN", raising=False)
    yield base
    stop_live_workers(base / "runs")
    # A server remembers that it has seen [auth] (sign-in fails closed); each test is a new server.
    signin = sys.modules.get("signin")
    if signin is not None:
        signin._auth_seen.clear()
    shutil.rmtree(SESSION_KERAS_HOME / "models", ignore_errors=True)


def write_image(path: Path, colour, size=(40, 32), fmt=None, noise_seed=0, mode="RGB"):
    """Writes a small image of one colour with a little noise (so files differ)."""
    rng = np.random.default_rng(noise_seed)
    array = np.clip(np.array(colour, dtype=np.int16) + rng.integers(-25, 25, (size[1], size[0], 3)), 0, 255)
    image = Image.fromarray(array.astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a server a test starts there."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_chromium(playwright, extra_arguments=()):
    """Debian's Chromium, headless, with CHROMIUM_ARGUMENTS (and `extra_arguments`)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGUMENTS, *extra_arguments])


@contextlib.contextmanager
def serve_dashboard(log_path: Path, environment: dict):
    """`streamlit run streamlit_app.py` on a free 127.0.0.1 port in its own process group; yields its URL.

    The server (and anything it starts) is ended by its process group id when the block ends.
    """
    import urllib.request

    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is not installed; .ci/run installs it (apt-get install chromium)")
    port = free_port()
    log = open(log_path, "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO_ROOT, env={**os.environ, **environment}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("the dashboard did not start: " + Path(log_path).read_text()[-2000:])
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


def screenshot_whole_page(page, path: Path, width: int = 1366, height: int = 900) -> None:
    """A full-page screenshot once Streamlit has drawn everything (no script running, no placeholders)."""
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60000)
    page.wait_for_function("document.querySelectorAll('[data-testid=\"stSkeleton\"]').length === 0", timeout=30000)
    page.wait_for_timeout(500)
    # The main area scrolls inside the page, so a full-page shot needs a viewport that tall.
    tall = page.evaluate("document.querySelector('[data-testid=\"stMain\"]')?.scrollHeight || 900")
    page.set_viewport_size({"width": width, "height": max(height, min(int(tall) + 100, 4000))})
    page.wait_for_timeout(600)  # images and tables lay themselves out again for the new size
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": width, "height": height})


def make_dataset(root: Path, classes=("cats", "dogs"), per_class=12, split=False, size=(40, 32)) -> Path:
    """A tiny dataset of coloured images: flat class folders, or train/validation/test folders."""
    for class_index, name in enumerate(classes):
        colour = CLASS_COLOURS.get(name, (30 * class_index, 255 - 30 * class_index, 120))
        if split:
            parts = {"train": per_class, "validation": max(2, per_class // 3), "test": max(2, per_class // 3)}
        else:
            parts = {None: per_class}
        for part, count in parts.items():
            folder = root / part / name if part else root / name
            for number in range(count):
                extension = ".jpg" if number % 2 == 0 else ".png"
                write_image(folder / f"{name}_{number}{extension}", colour, size, noise_seed=class_index * 1000 + number + (500 if part == "validation" else 0) + (700 if part == "test" else 0))
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """Two classes (cats, dogs), 12 images each, flat."""
    return make_dataset(tmp_path / "tiny")


@pytest.fixture
def tiny_three_class_dataset(tmp_path) -> Path:
    """Three classes, pre-split into train/validation/test."""
    return make_dataset(tmp_path / "tiny3", classes=("birds", "cats", "dogs"), per_class=9, split=True)


@pytest.fixture
def shared_dir() -> Path:
    """../shared, or a skip saying why when it is absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"real-data test: {SHARED}/data is not present beside the repo")
    return SHARED


@pytest.fixture
def keras_home_with_mobilenet(shared_dir) -> Path:
    """The session's temporary KERAS_HOME holding the real MobileNet(alpha=0.25) ImageNet weights.

    The file is copied (never linked, so nothing can write into ../shared) and removed after the test.
    """
    source = shared_dir / "keras_home" / "models" / "mobilenet_2_5_224_tf_no_top.h5"
    if not source.is_file():
        pytest.skip(f"real-data test: {source} is not present")
    (SESSION_KERAS_HOME / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy(source, SESSION_KERAS_HOME / "models" / source.name)
    return SESSION_KERAS_HOME


def wait_until(predicate, timeout=120.0, interval=0.2, what="condition"):
    """Polls `predicate` until it returns something true (returned), or fails after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# The files every finished run folder holds.
RUN_FILES = ["config.json", "status.json", "data_report.json", "split.csv", "metrics.jsonl", "model.keras",
             "labels.json", "evaluation.json", "predictions.csv", "worker.log"]


def tiny_config(data_path, **overrides):
    """A fast config: MobileNet α=0.25 at 32 px from random weights."""
    from engine.config import RunConfig

    values = {"data.path": str(data_path), "model.backbone": "MobileNet", "model.alpha": 0.25,
              "model.weights": "none", "model.image_size": 32, "training.epochs": 2,
              "training.batch_size": 8, "training.learning_rate": 0.01}
    values.update(overrides)
    return RunConfig().replace(**values)


def run_cli(*arguments, env=None, timeout=600):
    """Runs `python -m engine ...` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "engine", *map(str, arguments)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def job_config(data, epochs=200, **overrides):
    """A small run for job and fault tests: MobileNet α=0.25 at 48 px from random weights."""
    from engine.config import RunConfig

    values = {"data.path": str(data), "model.backbone": "MobileNet", "model.alpha": 0.25, "model.weights": "none",
              "model.image_size": 48, "training.epochs": epochs, "training.batch_size": 4}
    values.update(overrides)
    return RunConfig().replace(**values)


@pytest.fixture
def data(tmp_path):
    """60 images in two classes, for job and fault tests (decoding pauses half-way, at the 30th)."""
    return make_dataset(tmp_path / "data", per_class=30)


def stop_live_workers(root: Path) -> None:
    """Kills every worker (and its supervisor) still running a run under `root`.

    A failed assertion must not leave a paused or endless worker behind: each test cleans up
    the processes it started. Worker and supervisor share a process group, killed by its id.
    """
    from engine.executors import lock_is_held
    from engine.status import State, read_status

    for run_dir in Path(root).glob("*/"):
        status = read_status(run_dir)
        # A run trained inside this test process is never killed: its pid is pytest's own.
        if status.state is State.RUNNING and status.pid not in (None, os.getpid()) and lock_is_held(run_dir):
            try:
                os.killpg(os.getpgid(int(status.pid)), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def runs_dir(tmp_path):
    """A runs root for tests that start workers; every worker still running afterwards is killed."""
    root = tmp_path / "runs"
    yield root
    stop_live_workers(root)


@pytest.fixture
def slower_epochs(monkeypatch):
    """Every epoch sleeps a little (a test-only fault): a stop, a kill or a check meant to land
    mid-run must not race a few hundred head epochs that take milliseconds each on cached features."""
    from engine.runfiles import FAULT_VARIABLE

    monkeypatch.setenv(FAULT_VARIABLE, "epoch_end:sleep:0.05")


@pytest.fixture
def app_environment(monkeypatch, tmp_path):
    """Empty runs and data folders for the dashboard; runs it started are ended afterwards."""
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "appdata"))
    (tmp_path / "appdata").mkdir()
    yield tmp_path
    stop_live_workers(tmp_path / "runs")


def open_page(page: str):
    """A fresh session of the dashboard (Streamlit's AppTest) on `page`, run once."""
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(REPO_ROOT / "streamlit_app.py"), default_timeout=60)
    app.switch_page(page)
    return app.run()


def open_folder_on_data_page(folder):
    """The Data page with `folder` chosen as a folder on the server, as a user would choose it."""
    app = open_page("app_pages/data.py")
    app.radio(key="data_source").set_value("Folder on the server").run()
    app.text_input(key="typed_path").set_value(str(folder)).run()
    app.button[0].click().run()
    return app


def epoch_events(run_dir):
    """The per-epoch events of a run's metrics.jsonl, in order."""
    from engine import runfiles

    return [event for event in runfiles.read_jsonl(Path(run_dir) / "metrics.jsonl") if event.get("type") == "epoch"]

