"""The queue and the calls people make on runs: start, stop, kill, resume, wait, reconcile.

A run is started by creating its folder (`queued`) and letting the queue launch it when
a slot is free: `schedule` moves it to `running` (stage `starting`, a fresh `launch_id`)
and hands it to the runs root's executor (`engine.executors`). Every state change goes
through `engine.status.transition`; reading never writes, and liveness is the one
explicit step `reconcile`, which the scheduler (also run by each supervisor as its worker
ends), the Monitor page and the run listings (`reconcile_stale`) call.

This module never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Optional

from engine import runfiles
from engine.config import RunConfig
from engine.executors import START_GRACE_SECONDS, executor_for, lock_is_held
from engine.runs import create_run, default_runs_dir, resolve_run, run_folders
from engine.status import (FINAL_STATES, IllegalTransition, RunStatus, Stage, State, new_launch_id, now_iso,
                           read_status, transition)

QUEUE_FILE = "queue.json"
QUEUE_LOCK_FILE = ".queue.lock"
# A worker refreshes its heartbeat every second; a listed run silent for longer is checked.
STALE_HEARTBEAT_SECONDS = 5.0


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


def start(config: RunConfig, runs_dir: Optional[str | os.PathLike] = None, owner: str = "") -> str:
    """Creates a queued run and lets the queue start it when a slot is free.

    Returns:
        The run id.
    """
    run_dir = create_run(config, runs_dir, owner=owner)
    schedule(run_dir.parent)
    return run_dir.name


@contextlib.contextmanager
def _queue_lock(root: Path):
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / QUEUE_LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reconcile(run_dir: str | os.PathLike) -> RunStatus:
    """The run's status after checking its worker is alive: a dead worker's `running` run becomes `failed`.

    The one place liveness is decided; readers (`read_status`, `list_runs`) never do it.
    """
    run_dir = Path(run_dir)
    return executor_for(run_dir.parent).state(run_dir)


def reconcile_stale(runs: Iterable[RunStatus], runs_dir: Optional[str | os.PathLike] = None) -> bool:
    """Reconciles the listed runs that read `running` but whose heartbeat stopped; moves the queue on if one ended.

    For the places that list runs (the Home page, `python -m engine runs`): a run whose worker
    and supervisor died together (out of memory, a reboot) has nobody left to record it, and
    its status file never changes again. A live worker beats every second, so only runs
    silent for STALE_HEARTBEAT_SECONDS are checked: a lock test each, no file read.

    Returns:
        True when a run was found dead (the listing is then out of date).
    """
    ended = False
    for run in runs:
        if run.state is State.RUNNING and time.time() - (run.heartbeat or 0.0) > STALE_HEARTBEAT_SECONDS:
            ended = reconcile(run.path).state is not State.RUNNING or ended
    if ended:
        schedule(runs_dir)
    return ended


def schedule(runs_dir: Optional[str | os.PathLike] = None) -> list[str]:
    """Reconciles the running runs, then launches queued runs, oldest first, while slots are free.

    Safe to call from any process at any time: a lock in the runs root makes callers
    take turns. Returns the ids of the runs it launched.
    """
    root = Path(runs_dir or default_runs_dir())
    if not root.is_dir():
        return []
    launched = []
    with _queue_lock(root):
        statuses = {}
        for run_dir in run_folders(root):
            status = read_status(run_dir)
            statuses[run_dir] = reconcile(run_dir) if status.state is State.RUNNING else status
        running = sum(1 for status in statuses.values() if status.state is State.RUNNING)
        queued = sorted((run_dir for run_dir, status in statuses.items() if status.state is State.QUEUED),
                        key=lambda run_dir: (statuses[run_dir].queued_at or 0, run_dir.name))
        for run_dir in queued[:max(0, max_concurrent(root) - running)]:
            if _launch(run_dir):
                launched.append(run_dir.name)
    return launched


def _launch(run_dir: Path) -> bool:
    """Moves a queued run to running (stage starting, a new launch) and hands it to the executor."""
    launch_id = new_launch_id()
    try:
        transition(run_dir, State.RUNNING, stage=Stage.STARTING, message="Starting the worker process.",
                   expected={State.QUEUED}, launch_id=launch_id, launched_at=time.time(),
                   host=socket.gethostname(), pid=None)
    except IllegalTransition:
        return False  # Stopped or launched by another process since it was read.
    try:
        executor_for(run_dir.parent).submit(run_dir)
    except Exception as error:  # noqa: BLE001 - a launch that cannot start must not leave the run running
        message = f"The run could not be started: {' '.join(str(error).split()) or type(error).__name__}."
        # Only this launch, and only while no worker holds it: one that did start ends its launch itself.
        with contextlib.suppress(IllegalTransition):
            if not lock_is_held(run_dir):
                transition(run_dir, State.FAILED, stage=Stage.DONE, message=message, error=message, pid=None,
                           for_launch=launch_id, expected={State.RUNNING})
        return False
    return True


def stop(run: str, runs_dir: Optional[str | os.PathLike] = None) -> RunStatus:
    """Asks a run to stop: a running run finishes its batch, saves, evaluates and ends `stopped`.

    A queued run is taken off the queue at once. Returns the run's status.
    """
    run_dir = resolve_run(run, runs_dir)
    with _queue_lock(run_dir.parent):
        status = reconcile(run_dir)
        if status.state is State.QUEUED:
            with contextlib.suppress(IllegalTransition):
                return transition(run_dir, State.STOPPED, stage=Stage.DONE, message="Stopped before it started.",
                                  expected={State.QUEUED}, finished=now_iso())
            status = read_status(run_dir)
    if status.state is State.RUNNING:
        executor_for(run_dir.parent).stop(run_dir)
    return status


def kill(run: str, runs_dir: Optional[str | os.PathLike] = None) -> RunStatus:
    """Ends a run's worker at once; the run becomes `failed`, resumable from its last epoch."""
    run_dir = resolve_run(run, runs_dir)
    status = reconcile(run_dir)
    if status.state is State.QUEUED:
        return stop(run, runs_dir)
    if status.state is not State.RUNNING:
        return status
    executor_for(run_dir.parent).kill(run_dir)
    # The supervisor records the kill; wait briefly so the caller sees the final state.
    deadline = time.time() + 10
    while time.time() < deadline:
        status = reconcile(run_dir)
        if status.state is not State.RUNNING:
            break
        time.sleep(0.2)
    return status


def resume(run: str, runs_dir: Optional[str | os.PathLike] = None) -> RunStatus:
    """Queues a stopped or failed run to continue from its last completed epoch.

    The old worker's pid and launch are cleared at once, so nothing shows them as live.

    Raises:
        ValueError: the run is not stopped or failed, or its processes are still ending.
    """
    run_dir = resolve_run(run, runs_dir)
    # A run that just stopped may still have its supervisor finishing up; let it end first.
    deadline = time.time() + START_GRACE_SECONDS
    while lock_is_held(run_dir) and read_status(run_dir).state in FINAL_STATES and time.time() < deadline:
        time.sleep(0.1)
    with _queue_lock(run_dir.parent):
        status = reconcile(run_dir)
        if status.state not in (State.STOPPED, State.FAILED):
            raise ValueError(f"Run {run_dir.name} is {status.state}; only stopped or failed runs resume.")
        if lock_is_held(run_dir):
            raise ValueError(f"Run {run_dir.name} is still shutting down; try again in a few seconds.")
        for name in (runfiles.STOP_REQUEST_FILE, runfiles.KILL_REQUEST_FILE):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
        transition(run_dir, State.QUEUED, stage=Stage.QUEUED, message="Waiting to resume.",
                   expected={State.STOPPED, State.FAILED}, queued_at=time.time(), resumed=status.resumed + 1,
                   error=None, pid=None, launch_id=None, eta_seconds=None, finished=None)
    schedule(run_dir.parent)
    return read_status(run_dir)


def wait_for(run: str, states: Iterable[State] = FINAL_STATES, timeout: float = 600.0,
             runs_dir: Optional[str | os.PathLike] = None, poll_seconds: float = 0.5) -> RunStatus:
    """Polls (and reconciles) a run until its state is one of `states` (default: any final one) or time is up."""
    run_dir = resolve_run(run, runs_dir)
    wanted = {State(state) for state in states}
    deadline = time.time() + timeout
    while True:
        status = reconcile(run_dir)
        if status.state in wanted or time.time() >= deadline:
            return status
        time.sleep(poll_seconds)


def logs(run: str, runs_dir: Optional[str | os.PathLike] = None, lines: int = 40) -> str:
    """The last lines of a run's worker log, from its executor."""
    run_dir = resolve_run(run, runs_dir)
    return executor_for(run_dir.parent).logs(run_dir, lines)
