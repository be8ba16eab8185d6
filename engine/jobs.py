"""The queue and the calls people make on runs: start, stop, kill, resume, rename, delete, restore.

Every call that changes a run takes the acting user (`engine.users.User`; None means the
local user, as the CLI and local mode have) and refuses with a PermissionError naming the
owner unless the user owns the run or is an admin; viewers change nothing. Every such call
is appended to the runs root's audit log (`engine.audit`). The queue launches runs
round-robin across their owners, so one person's ten queued runs do not block everyone.

A run is started by creating its folder (`queued`) and letting the queue launch it when
a slot is free: `schedule` moves it to `running` (stage `starting`, a fresh `launch_id`)
and hands it to the run's executor (`engine.executors`: local, or a Ray cluster). Every
state change goes through `engine.status.transition`; reading never writes, and liveness
is the one explicit step `reconcile`, which the scheduler (also run by each supervisor,
or Ray job, as its worker ends), the Monitor page and the run listings (`reconcile_stale`)
call.

This module never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Optional

from engine import audit, runfiles
from engine.config import RunConfig
from engine.executors import (START_GRACE_SECONDS, executor_choice, executor_for, lock_is_held,
                              record_executor)
from engine.runs import create_run, default_runs_dir, resolve_run, run_folders
from engine.status import (FINAL_STATES, IllegalTransition, RunStatus, Stage, State, edit_summary, new_launch_id,
                           now_iso, read_status, set_priority, transition)
from engine.users import AccessSettings, Role, User, local_user

QUEUE_FILE = "queue.json"
QUEUE_LOCK_FILE = ".queue.lock"
TRASH_FOLDER = ".trash"
DELETED_NOTE = "deleted.json"
# A worker refreshes its heartbeat every second; a listed run silent for longer is checked.
STALE_HEARTBEAT_SECONDS = 5.0


def _queue_settings(root: Path) -> dict:
    settings = runfiles.read_json(root / QUEUE_FILE) or {}
    return settings if isinstance(settings, dict) else {}


def _update_queue_settings(root: Path, **values) -> None:
    # Read-modify-write of queue.json; callers hold the queue lock or are admins setting a value.
    root.mkdir(parents=True, exist_ok=True)
    runfiles.atomic_write_json(root / QUEUE_FILE, {**_queue_settings(root), **values})


def max_running_per_user(runs_dir: Optional[str | os.PathLike] = None) -> int:
    """How many of one person's runs may train at once (0: no limit), as the server last said.

    Kept in `queue.json`, so that every process that schedules (a supervisor whose worker
    just ended, the CLI) applies the limit the dashboard was configured with.
    """
    value = _queue_settings(Path(runs_dir or default_runs_dir())).get("max_running_per_user", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def max_concurrent(runs_dir: Optional[str | os.PathLike] = None) -> int:
    """How many runs may train at once: `queue.json` in the runs root, `$TRANSFER_STUDIO_MAX_RUNS`, else 1."""
    value = _queue_settings(Path(runs_dir or default_runs_dir())).get("max_concurrent")
    if value is None:
        value = os.environ.get("TRANSFER_STUDIO_MAX_RUNS", 1)
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


class QuotaExceeded(ValueError):
    """A user asked for more runs than the server's per-user limit allows."""


def _acting(user: Optional[User]) -> User:
    return user or local_user()


def authorize(user: Optional[User], status: RunStatus, action: str) -> User:
    """The acting user, when they may `action` (stop, kill, resume, rename, delete, restore) this run.

    Raises:
        PermissionError: a viewer, or a member who does not own the run; the message names the owner.
    """
    user = _acting(user)
    if user.role is Role.VIEWER:
        raise PermissionError(f"{user.name} is a viewer: viewers see runs but cannot {action} them.")
    if not user.can_control(status.owner):
        owner = status.owner_name or status.owner or "nobody (a run from before sign-in; admins only)"
        raise PermissionError(f"Run {status.run_id} belongs to {owner}; only its owner or an admin may "
                              f"{action} it (you are {user.name}, {user.role}).")
    return user


def _require_admin(user: Optional[User], what: str) -> User:
    user = _acting(user)
    if user.role is not Role.ADMIN:
        raise PermissionError(f"Only an admin may {what}; {user.name} is a {user.role}.")
    return user


def set_max_concurrent(count: int, runs_dir: Optional[str | os.PathLike] = None, user: Optional[User] = None,
                       source: str = "python") -> None:
    """Sets the queue's limit for this runs root (kept in `queue.json`); admins only."""
    user = _require_admin(user, "change how many runs train at once")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`max_concurrent` must be a whole number ≥ 1; received max_concurrent={count!r}.")
    root = Path(runs_dir or default_runs_dir())
    with _queue_lock(root):
        _update_queue_settings(root, max_concurrent=count)
    audit.record(root, user, "set_max_concurrent", source=source, detail={"max_concurrent": count})
    schedule(root)


def start(config: RunConfig, runs_dir: Optional[str | os.PathLike] = None, user: Optional[User] = None,
          limits: Optional[AccessSettings] = None, source: str = "python", executor: Optional[str] = None) -> str:
    """Creates a queued run owned by `user` and lets the queue start it when a slot is free.

    Args:
        config: The run's settings.
        runs_dir: The runs root.
        user: Who starts it (default: the local user).
        limits: The server's per-user limits (`max_queued_per_user`), if any.
        source: Where the call comes from, for the audit log.
        executor: `local` or `ray`; None for the server's default (`engine.executors.executor_choice`).
            Recorded in the run folder: the run stays with it.

    Returns:
        The run id.

    Raises:
        PermissionError: a viewer.
        QuotaExceeded: the user already has as many runs waiting as the server allows.
        ValueError: an unknown executor, or the Ray executor without a usable `RAY_ADDRESS`.
    """
    user = _acting(user)
    if not user.can_start:
        raise PermissionError(f"{user.name} is a viewer: viewers see runs but cannot start them.")
    choice = executor_choice(executor)
    root = Path(runs_dir or default_runs_dir())
    # Counting and creating under one lock: two tabs starting at once cannot both slip under the limit.
    with _queue_lock(root):
        if limits and limits.max_running_per_user != max_running_per_user(root):
            _update_queue_settings(root, max_running_per_user=limits.max_running_per_user)
        _check_queued_quota(root, user, limits)
        run_dir = create_run(config, root, owner=user)
        record_executor(run_dir, choice)
        audit.record(root, user, "start", run_dir.name, source)
    schedule(root)
    return run_dir.name


def _check_queued_quota(root: Path, user: User, limits: Optional[AccessSettings]) -> None:
    """Refuses one more queued run for `user` beyond `max_queued_per_user` (call under the queue lock)."""
    if not limits or not limits.max_queued_per_user:
        return
    waiting = sum(1 for folder in run_folders(root)
                  if (status := read_status(folder)).owner == user.id and status.state is State.QUEUED)
    if waiting >= limits.max_queued_per_user:
        raise QuotaExceeded(f"{user.name} already has {waiting} runs waiting in the queue, the most this "
                            f"server allows one person ({limits.max_queued_per_user}); nothing was queued. "
                            "Wait for one to start, or stop one.")


def _queue_lock(root: Path):
    """The runs root's queue lock: schedulers and the calls that change the queue take turns."""
    return runfiles.exclusive_lock(root / QUEUE_LOCK_FILE)


def reconcile(run_dir: str | os.PathLike) -> RunStatus:
    """The run's status after checking its worker is alive: a dead worker's `running` run becomes `failed`.

    The one place liveness is decided; readers (`read_status`, `list_runs`) never do it.
    """
    run_dir = Path(run_dir)
    return executor_for(run_dir).state(run_dir)


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
    """Reconciles the running runs, then launches queued runs while slots are free, round-robin by owner.

    Safe to call from any process at any time: a lock in the runs root makes callers
    take turns. Returns the ids of the runs it launched.
    """
    root = Path(runs_dir or default_runs_dir())
    if not root.is_dir():
        return []
    launched = []
    with _queue_lock(root):
        statuses = []
        for run_dir in run_folders(root):
            status = read_status(run_dir)
            statuses.append(reconcile(run_dir) if status.state is State.RUNNING else status)
        free = max_concurrent(root) - sum(1 for status in statuses if status.state is State.RUNNING)
        for status in next_in_turn(statuses, free, max_running_per_user(root)):
            if _launch(Path(status.path)):
                launched.append(status.run_id)
    return launched


def next_in_turn(statuses: list[RunStatus], slots: int, max_running_per_user: int = 0) -> list[RunStatus]:
    """The queued runs to launch into `slots` free slots: fair across owners, oldest first within each.

    A run an admin moved to the front goes first. Otherwise each slot goes to the owner with
    the fewest runs running, then to the one served longest ago (the latest launch of any of
    their runs), then to the one waiting longest; within an owner, the oldest run first. So one person's ten
    queued runs alternate with everyone else's instead of blocking them.
    """
    running, last_launch, waiting = {}, {}, {}
    for status in statuses:
        if status.state is State.RUNNING:
            running[status.owner] = running.get(status.owner, 0) + 1
        if status.launched_at:
            last_launch[status.owner] = max(last_launch.get(status.owner, 0.0), status.launched_at)
        if status.state is State.QUEUED:
            waiting.setdefault(status.owner, []).append(status)
    for runs in waiting.values():
        runs.sort(key=lambda status: (-(status.priority or 0), status.queued_at or 0.0, status.run_id))
    chosen = []
    while slots > 0:
        owners = [owner for owner, runs in waiting.items() if runs
                  and not (max_running_per_user and running.get(owner, 0) >= max_running_per_user)]
        if not owners:
            break
        owner = min(owners, key=lambda name: (-(waiting[name][0].priority or 0), running.get(name, 0),
                                              last_launch.get(name, 0.0), waiting[name][0].queued_at or 0.0))
        status = waiting[owner].pop(0)
        chosen.append(status)
        running[owner] = running.get(owner, 0) + 1
        last_launch[owner] = time.time()
        slots -= 1
    return chosen


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
        executor_for(run_dir).submit(run_dir)
    except Exception as error:  # noqa: BLE001 - a launch that cannot start must not leave the run running
        message = f"The run could not be started: {' '.join(str(error).split()) or type(error).__name__}."
        # Only this launch, and only while no worker holds it: one that did start ends its launch itself.
        with contextlib.suppress(IllegalTransition):
            if not lock_is_held(run_dir):
                transition(run_dir, State.FAILED, stage=Stage.DONE, message=message, error=message, pid=None,
                           for_launch=launch_id, expected={State.RUNNING})
        return False
    return True


def stop(run: str, runs_dir: Optional[str | os.PathLike] = None, user: Optional[User] = None,
         source: str = "python") -> RunStatus:
    """Asks a run to stop: a running run finishes its batch, saves, evaluates and ends `stopped`.

    A queued run is taken off the queue at once (that is how a queued run is cancelled).
    Returns the run's status.

    Raises:
        PermissionError: the user neither owns the run nor is an admin.
    """
    run_dir = resolve_run(run, runs_dir)
    user = authorize(user, read_status(run_dir), "stop")
    with _queue_lock(run_dir.parent):
        status = reconcile(run_dir)
        if status.state is State.QUEUED:
            with contextlib.suppress(IllegalTransition):
                stopped = transition(run_dir, State.STOPPED, stage=Stage.DONE, message="Stopped before it started.",
                                     expected={State.QUEUED}, finished=now_iso())
                audit.record(run_dir.parent, user, "stop", run_dir.name, source)
                return stopped
            status = read_status(run_dir)
    if status.state is State.RUNNING:
        # Only what was done is recorded: stopping an ended run changes nothing and is not logged.
        executor_for(run_dir).stop(run_dir)
        audit.record(run_dir.parent, user, "stop", run_dir.name, source)
    return status


def kill(run: str, runs_dir: Optional[str | os.PathLike] = None, user: Optional[User] = None,
         source: str = "python") -> RunStatus:
    """Ends a run's worker at once; the run becomes `failed`, resumable from its last epoch.

    Raises:
        PermissionError: the user neither owns the run nor is an admin.
    """
    run_dir = resolve_run(run, runs_dir)
    status = reconcile(run_dir)
    user = authorize(user, status, "kill")
    if status.state is State.QUEUED:
        return stop(run, runs_dir, user, source)
    if status.state is not State.RUNNING:
        return status
    executor_for(run_dir).kill(run_dir)
    audit.record(run_dir.parent, user, "kill", run_dir.name, source)
    # The supervisor records the kill; wait briefly so the caller sees the final state.
    deadline = time.time() + 10
    while time.time() < deadline:
        status = reconcile(run_dir)
        if status.state is not State.RUNNING:
            break
        time.sleep(0.2)
    return status


def resume(run: str, runs_dir: Optional[str | os.PathLike] = None, user: Optional[User] = None,
           source: str = "python", limits: Optional[AccessSettings] = None,
           executor: Optional[str] = None) -> RunStatus:
    """Queues a stopped or failed run to continue from its last completed epoch.

    The old worker's pid and launch are cleared at once, so nothing shows them as live.
    `executor` (`local` or `ray`) moves the run to that executor; None keeps the one it has.

    Raises:
        PermissionError: the user neither owns the run nor is an admin.
        ValueError: the run is not stopped or failed, or its processes are still ending; an
            unknown executor, or the Ray executor without a usable `RAY_ADDRESS`.
    """
    run_dir = resolve_run(run, runs_dir)
    user = authorize(user, read_status(run_dir), "resume")
    choice = executor_choice(executor) if executor is not None else None
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
        # A resumed run waits in the queue again: it counts against its owner's queued limit.
        owner = User(id=status.owner, name=status.owner_name or status.owner or "the owner")
        _check_queued_quota(run_dir.parent, owner, limits)
        for name in (runfiles.STOP_REQUEST_FILE, runfiles.KILL_REQUEST_FILE):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
        if choice is not None:
            record_executor(run_dir, choice)
        transition(run_dir, State.QUEUED, stage=Stage.QUEUED, message="Waiting to resume.",
                   expected={State.STOPPED, State.FAILED}, queued_at=time.time(), resumed=status.resumed + 1,
                   error=None, pid=None, launch_id=None, eta_seconds=None, finished=None)
    audit.record(run_dir.parent, user, "resume", run_dir.name, source)
    schedule(run_dir.parent)
    return read_status(run_dir)


def rename(run: str, name: str, runs_dir: Optional[str | os.PathLike] = None, user: Optional[User] = None,
           source: str = "python") -> RunStatus:
    """Gives a run a new human name (its id and folder stay); owner or admin.

    Raises:
        PermissionError: the user neither owns the run nor is an admin.
        ValueError: the name is empty or longer than 120 characters.
    """
    run_dir = resolve_run(run, runs_dir)
    user = authorize(user, read_status(run_dir), "rename")
    name = " ".join(str(name).split())
    if not name or len(name) > 120:
        raise ValueError(f"A run's name must have 1 to 120 characters; received {len(name)}.")
    status = edit_summary(run_dir, name=name)
    audit.record(run_dir.parent, user, "rename", run_dir.name, source, {"name": name})
    return status


def delete(run: str, runs_dir: Optional[str | os.PathLike] = None, user: Optional[User] = None,
           source: str = "python") -> Path:
    """Moves an ended run's folder to the runs root's trash, from which `restore` brings it back.

    Nothing is removed: the folder moves whole (one rename), with a note of who deleted it.

    Returns:
        The folder in the trash.

    Raises:
        PermissionError: the user neither owns the run nor is an admin.
        ValueError: the run is queued or running (stop it first).
    """
    run_dir = resolve_run(run, runs_dir)
    root = run_dir.parent
    with _queue_lock(root):
        status = reconcile(run_dir)
        user = authorize(user, status, "delete")
        if status.state in (State.QUEUED, State.RUNNING):
            raise ValueError(f"Run {run_dir.name} is {status.state}; stop it before deleting it.")
        trash = root / TRASH_FOLDER
        trash.mkdir(exist_ok=True)
        target = trash / run_dir.name
        if target.exists():
            raise ValueError(f"The trash already holds a run {run_dir.name}; restore or remove that one first.")
        runfiles.atomic_write_json(run_dir / DELETED_NOTE, {"by": user.id, "by_name": user.name, "at": now_iso()})
        # Recorded first: if the audit log cannot be written, the run is not moved either.
        audit.record(root, user, "delete", run_dir.name, source)
        os.rename(run_dir, target)
    return target


def trash(runs_dir: Optional[str | os.PathLike] = None) -> list[RunStatus]:
    """The deleted runs that can be restored, newest first."""
    folder = Path(runs_dir or default_runs_dir()) / TRASH_FOLDER
    return [read_status(entry) for entry in run_folders(folder)] if folder.is_dir() else []


def restore(run_id: str, runs_dir: Optional[str | os.PathLike] = None, user: Optional[User] = None,
            source: str = "python") -> Path:
    """Brings a deleted run back from the trash to the runs root; owner or admin.

    Raises:
        PermissionError: the user neither owns the run nor is an admin.
        ValueError: no such run in the trash, or a run of that id exists again.
    """
    root = Path(runs_dir or default_runs_dir())
    source_dir = root / TRASH_FOLDER / run_id
    if "/" in run_id or run_id.startswith(".") or not (source_dir / runfiles.CONFIG_FILE).is_file():
        raise ValueError(f"No run {run_id!r} in the trash of {root}.")
    with _queue_lock(root):
        user = authorize(user, read_status(source_dir), "restore")
        if (root / run_id).exists():
            raise ValueError(f"A run {run_id} exists already in {root}; it cannot be restored over it.")
        audit.record(root, user, "restore", run_id, source)
        os.rename(source_dir, root / run_id)
        (root / run_id / DELETED_NOTE).unlink(missing_ok=True)
    return root / run_id


def move_to_front(run: str, runs_dir: Optional[str | os.PathLike] = None, user: Optional[User] = None,
                  source: str = "python") -> RunStatus:
    """Puts a queued run first in the queue, whoever owns it; admins only."""
    run_dir = resolve_run(run, runs_dir)
    user = _require_admin(user, "reorder the queue")
    with _queue_lock(run_dir.parent):
        waiting = [read_status(folder) for folder in run_folders(run_dir.parent)]
        top = max((status.priority or 0 for status in waiting), default=0)
        status = set_priority(run_dir, top + 1)
    audit.record(run_dir.parent, user, "move_to_front", run_dir.name, source)
    schedule(run_dir.parent)
    return status


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
    return executor_for(run_dir).logs(run_dir, lines)
