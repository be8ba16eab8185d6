"""Runs as OS processes: start, stop, kill, resume, and a queue that starts runs by itself.

Each run is trained by `python -m engine worker RUN_DIR`, an ordinary command any
scheduler can run. `start` launches it through a small supervisor,
`python -m engine supervise RUN_DIR`, in a session of its own, so closing a tab,
reloading a page or restarting the Streamlit server neither stops nor hides it.

The supervisor holds an exclusive lock on `RUN_DIR/worker.lock` (shared with the
worker it spawns) for as long as either lives. Anyone can tell whether a run's
processes are alive by trying that lock; the kernel releases it when they die,
even by `kill -9`. When the worker ends, the supervisor records what happened
(a crash or a kill becomes `failed` with a message) and starts the next queued
run, so the queue moves on with no page or CLI open.

This module never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from engine import runfiles
from engine.config import RunConfig
from engine.runs import FINAL_STATES, create_run, default_runs_dir, now_iso, read_status, resolve_run

LOCK_FILE = "worker.lock"
QUEUE_FILE = "queue.json"
QUEUE_LOCK_FILE = ".queue.lock"
STOP_REQUEST_FILE = runfiles.STOP_REQUEST_FILE
KILL_REQUEST_FILE = runfiles.KILL_REQUEST_FILE
# A launched supervisor takes well under a second to take its lock; this is the grace
# period before a run whose lock is free is judged dead.
START_GRACE_SECONDS = 20.0
# Runs on another machine (shared runs folder) are judged by their heartbeat alone.
REMOTE_HEARTBEAT_TIMEOUT_SECONDS = 8.0
ENGINE_PARENT = str(Path(__file__).resolve().parents[1])


def max_concurrent(runs_dir: Optional[str | os.PathLike] = None) -> int:
    """How many runs may train at once: `queue.json` in the runs root, `$TRANSFER_STUDIO_MAX_RUNS`, else 1."""
    settings = runfiles.read_json(Path(runs_dir or default_runs_dir()) / QUEUE_FILE) or {}
    value = settings.get("max_concurrent") if isinstance(settings, dict) else None
    if value is None:
        value = os.environ.get("TRANSFER_STUDIO_MAX_RUNS", 1)
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


def set_max_concurrent(count: int, runs_dir: Optional[str | os.PathLike] = None) -> None:
    """Sets the queue's limit for this runs root (kept in `queue.json`)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`max_concurrent` must be a whole number ≥ 1; received max_concurrent={count!r}.")
    root = Path(runs_dir or default_runs_dir())
    root.mkdir(parents=True, exist_ok=True)
    runfiles.atomic_write_json(root / QUEUE_FILE, {"max_concurrent": count})


def start(config: RunConfig, runs_dir: Optional[str | os.PathLike] = None) -> str:
    """Creates a queued run and lets the queue start it when a slot is free.

    Returns:
        The run id.
    """
    run_dir = create_run(config, runs_dir)
    schedule(run_dir.parent)
    return run_dir.name


@contextlib.contextmanager
def _exclusive(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def schedule(runs_dir: Optional[str | os.PathLike] = None) -> list[str]:
    """Starts queued runs, oldest first, while fewer than `max_concurrent` are running.

    Safe to call from any process at any time: a lock in the runs root makes callers
    take turns. Returns the ids of the runs it launched.
    """
    root = Path(runs_dir or default_runs_dir())
    if not root.is_dir():
        return []
    launched = []
    with _exclusive(root / QUEUE_LOCK_FILE):
        statuses = {}
        for run_dir in _run_folders(root):
            statuses[run_dir] = refresh(run_dir)
        running = sum(1 for status in statuses.values() if status.get("state") == "running")
        queued = sorted((run_dir for run_dir, status in statuses.items() if status.get("state") == "queued"),
                        key=lambda run_dir: (statuses[run_dir].get("queued_at") or 0, run_dir.name))
        for run_dir in queued[:max(0, max_concurrent(root) - running)]:
            _launch(run_dir)
            launched.append(run_dir.name)
    return launched


def _run_folders(root: Path) -> list[Path]:
    return sorted(entry for entry in root.iterdir()
                  if entry.is_dir() and (entry / runfiles.CONFIG_FILE).is_file())


def _child_environment() -> dict:
    """This process's environment, with the engine importable whatever the child's working folder."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [ENGINE_PARENT, environment.get("PYTHONPATH")]))
    return environment


def _launch(run_dir: Path) -> None:
    """Marks the run as starting and launches its supervisor, detached from this process."""
    status = read_status(run_dir)
    status.update(state="running", phase="starting", message="Starting the worker process.",
                  launched_at=time.time(), host=socket.gethostname(), heartbeat=time.time())
    runfiles.atomic_write_json(run_dir / runfiles.STATUS_FILE, status)
    environment = _child_environment()
    # The launcher exits at once after spawning the supervisor in a new session, so the
    # supervisor is adopted by init and never lingers as a zombie of this process.
    subprocess.run(
        [sys.executable, "-m", "engine", "supervise", str(run_dir), "--detach"],
        env=environment, cwd=ENGINE_PARENT, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60,
    )


def lock_is_held(run_dir: str | os.PathLike) -> bool:
    """True while the run's supervisor or worker process is alive on this machine."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return False
    try:
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def refresh(run_dir: str | os.PathLike) -> dict:
    """Reads a run's status and, when its processes have died, records it as failed.

    A run left `running` by a worker that was killed, ran out of memory or crashed is
    turned into `failed` with a message, so no run stays "running" forever.
    """
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status.get("state") != "running":
        return status
    if status.get("host") not in (None, socket.gethostname()):
        age = time.time() - _seconds(status.get("heartbeat"))
        if age <= REMOTE_HEARTBEAT_TIMEOUT_SECONDS:
            return status
        return _mark_dead(run_dir, f"No heartbeat from host {status.get('host')} for {age:.0f} s.")
    if lock_is_held(run_dir):
        return status
    if status.get("phase") == "starting" and time.time() - _seconds(status.get("launched_at")) < START_GRACE_SECONDS:
        return status
    return _mark_dead(run_dir, "The worker process ended without finishing (killed, out of memory or crashed).")


def _seconds(value) -> float:
    """A Unix time from status.json; one that is not a number (a file edited by hand) counts as long ago."""
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


def _mark_dead(run_dir: Path, message: str) -> dict:
    # Take the lock so a worker finishing at this very moment cannot be overwritten.
    path = run_dir / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_status(run_dir)
        try:
            status = read_status(run_dir)
            if status.get("state") != "running":
                return status
            if (run_dir / KILL_REQUEST_FILE).exists():
                message = "Killed by the user."
            status.update(state="failed", phase="failed", message=message, error=message,
                          finished=now_iso(), pid=None)
            runfiles.atomic_write_json(run_dir / runfiles.STATUS_FILE, status)
            return status
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stop(run: str, runs_dir: Optional[str | os.PathLike] = None) -> dict:
    """Asks a run to stop: a running run finishes its batch, saves, evaluates and ends `stopped`.

    A queued run is taken off the queue at once. Returns the run's status.
    """
    run_dir = resolve_run(run, runs_dir)
    with _exclusive(run_dir.parent / QUEUE_LOCK_FILE):
        status = refresh(run_dir)
        if status.get("state") == "queued":
            status.update(state="stopped", phase="stopped", message="Stopped before it started.",
                          finished=now_iso())
            runfiles.atomic_write_json(run_dir / runfiles.STATUS_FILE, status)
            return status
    if status.get("state") == "running":
        runfiles.atomic_write_text(run_dir / STOP_REQUEST_FILE, now_iso() + "\n")
    return status


def kill(run: str, runs_dir: Optional[str | os.PathLike] = None) -> dict:
    """Ends a run's worker at once (SIGKILL); the run becomes `failed`, resumable from its last epoch."""
    run_dir = resolve_run(run, runs_dir)
    status = refresh(run_dir)
    if status.get("state") == "queued":
        return stop(run, runs_dir)
    if status.get("state") != "running":
        return status
    runfiles.atomic_write_text(run_dir / KILL_REQUEST_FILE, now_iso() + "\n")
    pid = status.get("pid")
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)
    # The supervisor records the kill; wait briefly so the caller sees the final state.
    deadline = time.time() + 10
    while time.time() < deadline:
        status = refresh(run_dir)
        if status.get("state") != "running":
            break
        time.sleep(0.2)
    return status


def resume(run: str, runs_dir: Optional[str | os.PathLike] = None) -> dict:
    """Queues a stopped or failed run to continue from its last completed epoch.

    Raises:
        ValueError: the run is not stopped or failed.
    """
    run_dir = resolve_run(run, runs_dir)
    # A run that just stopped may still have its supervisor finishing up; let it end first.
    deadline = time.time() + START_GRACE_SECONDS
    while lock_is_held(run_dir) and refresh(run_dir).get("state") in FINAL_STATES and time.time() < deadline:
        time.sleep(0.1)
    with _exclusive(run_dir.parent / QUEUE_LOCK_FILE):
        status = refresh(run_dir)
        if status.get("state") not in ("stopped", "failed"):
            raise ValueError(f"Run {run_dir.name} is {status.get('state')}; only stopped or failed runs resume.")
        if lock_is_held(run_dir):
            raise ValueError(f"Run {run_dir.name} is still shutting down; try again in a few seconds.")
        for name in (STOP_REQUEST_FILE, KILL_REQUEST_FILE):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
        status.update(state="queued", phase="queued", message="Waiting to resume.", queued_at=time.time(),
                      resumed=(status.get("resumed") or 0) + 1, error=None)
        runfiles.atomic_write_json(run_dir / runfiles.STATUS_FILE, status)
    schedule(run_dir.parent)
    return read_status(run_dir)


def supervise(run_dir: str | os.PathLike) -> int:
    """Runs the worker for `run_dir`, records how it ended, then starts the next queued run."""
    run_dir = Path(run_dir)
    lock_handle = open(run_dir / LOCK_FILE, "a+")
    # The previous supervisor of this run may still be writing its last status; wait for it.
    if not _acquire_within(lock_handle, START_GRACE_SECONDS / 2):
        lock_handle.close()
        return 1  # Another supervisor is running this run.
    launched_at = read_status(run_dir).get("launched_at")
    environment = _child_environment()
    environment["TRANSFER_STUDIO_LOCK_INHERITED"] = "1"
    with open(run_dir / runfiles.LOG_FILE, "a", encoding="utf-8") as log:
        # The worker inherits the locked file, so the lock lives as long as either process.
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine", "worker", str(run_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment, cwd=ENGINE_PARENT,
            pass_fds=(lock_handle.fileno(),),
        )
        return_code = worker.wait()
    status = read_status(run_dir)
    # Only judge the launch this supervisor was started for: a resume may already have queued a new one.
    if status.get("launched_at") == launched_at and status.get("state") in ("running", "queued", "unknown"):
        if (run_dir / KILL_REQUEST_FILE).exists():
            message = "Killed by the user."
        elif return_code < 0:
            message = f"The worker process was killed by signal {-return_code} ({_signal_name(-return_code)})."
        else:
            message = f"The worker process exited with code {return_code} before finishing; see worker.log."
        status.update(state="failed", phase="failed", message=message, error=message, finished=now_iso(), pid=None)
        runfiles.atomic_write_json(run_dir / runfiles.STATUS_FILE, status)
    fcntl.flock(lock_handle, fcntl.LOCK_UN)
    lock_handle.close()
    schedule(run_dir.parent)
    return 0


def _acquire_within(handle, seconds: float) -> bool:
    """Takes an exclusive lock on an open file, waiting at most `seconds`."""
    deadline = time.time() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.time() >= deadline:
                return False
            time.sleep(0.1)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def launch_detached_supervisor(run_dir: str | os.PathLike) -> None:
    """Spawns `python -m engine supervise RUN_DIR` in a new session and returns at once."""
    subprocess.Popen(
        [sys.executable, "-m", "engine", "supervise", str(run_dir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, cwd=ENGINE_PARENT, env=_child_environment(),
    )


def wait_for(run: str, states=FINAL_STATES, timeout: float = 600.0,
             runs_dir: Optional[str | os.PathLike] = None, poll_seconds: float = 0.5) -> dict:
    """Polls a run until its state is one of `states` (default: any final state) or the timeout passes."""
    run_dir = resolve_run(run, runs_dir)
    deadline = time.time() + timeout
    while True:
        status = refresh(run_dir)
        if status.get("state") in states or time.time() >= deadline:
            return status
        time.sleep(poll_seconds)
