"""A run's status: one schema (`RunStatus`), one writer (this module), one lock.

`status.json` says where a run is in its life. Its `state` moves only along
`LEGAL_MOVES`, through `transition`, under the run's `status.lock`; while a run is
`running`, only the live launch (the one whose `launch_id` the file holds) may write
progress, through `record_progress`. So a worker that was declared dead, or a
supervisor of an earlier launch, can never overwrite a newer state.

Reading (`read_status`) never writes. A file that is missing, cut short, of the wrong
shape or with fields of the wrong type reads as `State.UNKNOWN`, which is never written.
Folders written before this schema (a `phase` sentence, no summary) still read: the
stage is derived from the sentence and the summary from `config.json` and, for those
old folders only, `metrics.jsonl`.

This module never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from engine import runfiles

SCHEMA_VERSION = 2
STATUS_LOCK_FILE = "status.lock"


class State(str, enum.Enum):
    """Where a run is in its life. `UNKNOWN` is only ever read (a missing or damaged file)."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"
    UNKNOWN = "unknown"

    @property
    def is_final(self) -> bool:
        """True for the states a run ends a launch in."""
        return self in FINAL_STATES

    def __str__(self) -> str:
        return self.value


class Stage(str, enum.Enum):
    """What a run is doing, for code and tests; the human sentence is `RunStatus.message`."""

    QUEUED = "queued"
    STARTING = "starting"
    PREPARING_DATA = "preparing_data"
    BUILDING_MODEL = "building_model"
    COMPUTING_FEATURES = "computing_features"
    TRAINING_HEAD = "training_head"
    FINE_TUNING = "fine_tuning"
    SAVING = "saving"
    EVALUATING = "evaluating"
    DONE = "done"

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset({State.FINISHED, State.STOPPED, State.FAILED})
# queued → running → finished/stopped/failed; a queued run may be stopped (taken off the
# queue) or fail to launch; stopped and failed runs go back to the queue on resume.
LEGAL_MOVES = {
    State.QUEUED: frozenset({State.RUNNING, State.STOPPED, State.FAILED}),
    State.RUNNING: frozenset({State.FINISHED, State.STOPPED, State.FAILED}),
    State.STOPPED: frozenset({State.QUEUED}),
    State.FAILED: frozenset({State.QUEUED}),
    State.FINISHED: frozenset(),
    State.UNKNOWN: frozenset(),
}
# The display sentences that served as the stage before this schema, for old run folders.
LEGACY_PHASES = {
    "queued": Stage.QUEUED, "starting": Stage.STARTING, "preparing": Stage.STARTING,
    "checking data": Stage.PREPARING_DATA, "building model": Stage.BUILDING_MODEL,
    "computing features": Stage.COMPUTING_FEATURES, "phase 1: training the new head": Stage.TRAINING_HEAD,
    "phase 2: fine-tuning": Stage.FINE_TUNING, "saving": Stage.SAVING, "evaluating": Stage.EVALUATING,
}


class IllegalTransition(ValueError):
    """A state move that `LEGAL_MOVES` does not allow, or one made for a launch that is not current."""


@dataclass(frozen=True)
class RunStatus:
    """The contents of `status.json`: the run's state, stage and progress, and what lists show.

    Attributes:
        run_id: The run folder's name.
        state: Where the run is in its life.
        stage: What it is doing (machine-readable).
        message: One human sentence about it.
        error: The failure's one-line message, when `state` is failed.
        owner: Who started the run (`engine.users.User.id`); it never changes.
        owner_name: The owner's name, for display.
        name, backbone, dataset: What lists show about the run (from its config).
        description, tags: What its owner wrote about it and the labels it is found by (editable).
        epoch, epochs, step, steps: Progress: the epoch under way of all planned, the batch of the epoch.
        eta_seconds, images_per_second: Estimated time left and the current speed.
        best_val_accuracy: The best validation accuracy of any completed epoch so far.
        validation_accuracy: The final model's validation accuracy, once evaluated.
        created, started, finished: ISO 8601 times (UTC) of creation, of the worker's start, of the end.
        queued_at, launched_at, heartbeat: Unix times: queued, handed to an executor, last sign of life.
        pid, host: The live worker's process id and host (None when no worker runs).
        launch_id: Which launch of the run is current; only it may write progress.
        resumed: How many times the run was resumed.
        priority: Queue priority set by an admin (higher goes first; 0 for none).
        path: The run folder as it was read (not stored in the file).
    """

    run_id: str
    state: State
    stage: Stage = Stage.QUEUED
    message: str = ""
    error: Optional[str] = None
    owner: str = ""
    owner_name: str = ""
    name: str = ""
    description: str = ""
    tags: tuple = ()
    backbone: Optional[str] = None
    dataset: Optional[str] = None
    epoch: Optional[int] = None
    epochs: Optional[int] = None
    step: Optional[int] = None
    steps: Optional[int] = None
    eta_seconds: Optional[float] = None
    images_per_second: Optional[float] = None
    best_val_accuracy: Optional[float] = None
    validation_accuracy: Optional[float] = None
    created: Optional[str] = None
    started: Optional[str] = None
    finished: Optional[str] = None
    queued_at: Optional[float] = None
    launched_at: Optional[float] = None
    heartbeat: Optional[float] = None
    pid: Optional[int] = None
    host: Optional[str] = None
    launch_id: Optional[str] = None
    resumed: int = 0
    priority: int = 0
    schema: int = SCHEMA_VERSION
    path: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        """The status as written to `status.json` (enums as their text, without `path`)."""
        data = dataclasses.asdict(self)
        data.pop("path")
        data["state"], data["stage"] = self.state.value, self.stage.value
        data["tags"] = list(self.tags)
        return data

    def with_changes(self, **fields: Any) -> "RunStatus":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **fields)


FIELD_TYPES = {
    "epoch": int, "epochs": int, "step": int, "steps": int, "pid": int, "resumed": int, "priority": int, "schema": int,
    "eta_seconds": float, "images_per_second": float, "best_val_accuracy": float, "validation_accuracy": float,
    "queued_at": float, "launched_at": float, "heartbeat": float,
    "message": str, "error": str, "owner": str, "owner_name": str, "name": str, "description": str, "backbone": str,
    "dataset": str,
    "created": str, "started": str, "finished": str, "host": str, "launch_id": str, "run_id": str,
}


def now_iso() -> str:
    """The current UTC time as ISO 8601 text."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def status_path(run_dir: str | os.PathLike) -> Path:
    """Where a run's status is kept."""
    return Path(run_dir) / runfiles.STATUS_FILE


def unknown_status(run_dir: str | os.PathLike, why: str = "status.json is missing or unreadable.") -> RunStatus:
    """What a run whose status cannot be read reads as."""
    return RunStatus(run_id=Path(run_dir).name, state=State.UNKNOWN, stage=Stage.QUEUED, message=why,
                     path=str(run_dir))


def read_status(run_dir: str | os.PathLike) -> RunStatus:
    """The run's status as it is on disk; never writes, never raises on a damaged file."""
    raw = runfiles.read_json(status_path(run_dir))
    status = parse_status(raw, run_dir)
    if status is None:
        return unknown_status(run_dir)
    if raw.get("schema") is None:
        status = _with_legacy_summary(status, Path(run_dir))
    return status


def parse_status(raw: Any, run_dir: str | os.PathLike) -> Optional[RunStatus]:
    """A RunStatus from the JSON of `status.json`, or None when it is not a status.

    A field of the wrong type (a number written as text by hand, say) makes the whole file
    unreadable rather than half-believed.
    """
    if not isinstance(raw, dict):
        return None
    try:
        state = State(raw.get("state"))
    except ValueError:
        return None
    if state is State.UNKNOWN:
        return None
    values: dict[str, Any] = {}
    for name, kind in FIELD_TYPES.items():
        value = raw.get(name)
        if value is None:
            continue
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is float and not math.isfinite(value)):
            return None
        values[name] = value
    tags = raw.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            return None
        values["tags"] = tuple(tags)
    # The folder's name is the run's id, whatever the file says: a copied or renamed folder is its own run.
    values["run_id"] = Path(run_dir).name
    stage_text = raw.get("stage")
    if stage_text is None:
        stage = _legacy_stage(raw.get("phase"), state)
    else:
        try:
            stage = Stage(stage_text)
        except ValueError:
            return None
    return RunStatus(state=state, stage=stage, path=str(run_dir), **values)


def _legacy_stage(phase: Any, state: State) -> Stage:
    if state.is_final:
        return Stage.DONE
    if state is State.QUEUED:
        return Stage.QUEUED
    return LEGACY_PHASES.get(phase if isinstance(phase, str) else "", Stage.STARTING)


def _with_legacy_summary(status: RunStatus, run_dir: Path) -> RunStatus:
    """Fills the list summary of a folder written before the schema had one.

    Only such old folders read `config.json` and `metrics.jsonl` here; every run written
    now carries its summary in `status.json`.
    """
    config = runfiles.read_json(run_dir / runfiles.CONFIG_FILE) or {}
    model = config.get("model") if isinstance(config, dict) else None
    data = config.get("data") if isinstance(config, dict) else None
    accuracies = [event.get("val_accuracy") for event in runfiles.read_jsonl(run_dir / runfiles.METRICS_FILE)
                  if event.get("type") == "epoch"]
    accuracies = [value for value in accuracies if isinstance(value, (int, float))]
    return status.with_changes(
        name=status.name or (config.get("name") if isinstance(config, dict) and isinstance(config.get("name"), str)
                             else ""),
        backbone=status.backbone or (model.get("backbone") if isinstance(model, dict) else None),
        dataset=status.dataset or (data.get("path") if isinstance(data, dict) else None),
        best_val_accuracy=max(accuracies) if accuracies else status.best_val_accuracy,
    )


@contextlib.contextmanager
def status_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Holds the run's status lock: one writer of `status.json` at a time, across processes."""
    with runfiles.exclusive_lock(Path(run_dir) / STATUS_LOCK_FILE):
        yield


def _write(run_dir: str | os.PathLike, status: RunStatus) -> RunStatus:
    runfiles.atomic_write_json(status_path(run_dir), status.to_dict())
    return status.with_changes(path=str(run_dir))


def create_status(run_dir: str | os.PathLike, **summary: Any) -> RunStatus:
    """Writes the first status of a new run folder: queued, with its list summary.

    Raises:
        IllegalTransition: the folder already has a status.
    """
    with status_lock(run_dir):
        if status_path(run_dir).exists():
            raise IllegalTransition(f"Run {Path(run_dir).name} already has a status.")
        now = time.time()
        return _write(run_dir, RunStatus(
            run_id=Path(run_dir).name, state=State.QUEUED, stage=Stage.QUEUED, message="Waiting to start.",
            created=now_iso(), queued_at=now, heartbeat=now, **summary))


# The fields a run's owner or an admin may change by hand at any time (not progress, not state).
EDITABLE_FIELDS = frozenset({"name", "description", "tags"})


def edit_summary(run_dir: str | os.PathLike, **fields: Any) -> RunStatus:
    """Changes what a person may edit about a run (name, description, tags), under the run's lock, in any state.

    Raises:
        ValueError: a field that is not editable.
        IllegalTransition: the status is unreadable.
    """
    unknown = set(fields) - EDITABLE_FIELDS
    if unknown:
        raise ValueError(f"Only {', '.join(sorted(EDITABLE_FIELDS))} can be edited; received {', '.join(sorted(unknown))}.")
    with status_lock(run_dir):
        current = read_status(run_dir)
        if current.state is State.UNKNOWN:
            raise IllegalTransition(f"Run {current.run_id}'s status.json is missing or unreadable.")
        return _write(run_dir, current.with_changes(**fields))


def set_priority(run_dir: str | os.PathLike, priority: int) -> RunStatus:
    """Sets a queued run's priority in the queue (higher goes first), under the run's lock.

    Raises:
        IllegalTransition: the run is not queued.
    """
    with status_lock(run_dir):
        current = read_status(run_dir)
        if current.state is not State.QUEUED:
            raise IllegalTransition(f"Run {current.run_id} is {current.state}; only a queued run can be reordered.")
        return _write(run_dir, current.with_changes(priority=priority))


def transition(run_dir: str | os.PathLike, to: State, *, stage: Stage, message: str,
               expected: Optional[frozenset | set | tuple] = None, for_launch: Optional[str] = None,
               **fields: Any) -> RunStatus:
    """Moves a run to state `to`, under the run's lock; the only way any state changes.

    Args:
        run_dir: The run folder.
        to: The new state.
        stage, message: The stage and sentence that go with it.
        expected: Refuse unless the current state is one of these (besides being a legal move).
        for_launch: Refuse unless this launch is the current one (a worker or supervisor ending
            its own launch); None when the caller is not a launch (the queue, a user's request).
        **fields: Other RunStatus fields to set (`launch_id` among them, when launching).

    Returns:
        The new status.

    Raises:
        IllegalTransition: the move is not in `LEGAL_MOVES`, the state is not an expected one,
            or `launch_id` is not the current launch.
    """
    with status_lock(run_dir):
        current = read_status(run_dir)
        _check_move(current, to, expected, for_launch)
        changes = dict(fields, state=to, stage=stage, message=message, heartbeat=time.time())
        return _write(run_dir, current.with_changes(**changes))


def _check_move(current: RunStatus, to: State, expected, launch_id: Optional[str]) -> None:
    name = current.run_id
    if current.state is State.UNKNOWN:
        raise IllegalTransition(f"Run {name}'s status.json is missing or unreadable; it cannot move to {to}.")
    if to not in LEGAL_MOVES[current.state]:
        raise IllegalTransition(f"Run {name} is {current.state}; it cannot move to {to}.")
    if expected is not None and current.state not in expected:
        raise IllegalTransition(f"Run {name} is {current.state}, not {' or '.join(map(str, expected))}.")
    if launch_id is not None and current.launch_id != launch_id:
        raise IllegalTransition(f"Run {name} was launched again since; this launch's result is not recorded.")


def new_launch_id() -> str:
    """A fresh id for one launch of a run."""
    return secrets.token_hex(6)


def record_progress(run_dir: str | os.PathLike, launch_id: str, last_known: Optional[RunStatus] = None,
                    **fields: Any) -> Optional[RunStatus]:
    """Writes progress of a running launch (stage, epoch, speed, heartbeat…); the state does not change.

    Args:
        run_dir: The run folder.
        launch_id: The writer's launch; nothing is written unless it is the current one.
        last_known: The writer's last status, to repair a file damaged (by hand) while it runs:
            the live launch is the one process that knows the whole status.
        **fields: The fields to change; `state` is not one of them.

    Returns:
        The new status, or None when this launch is no longer the current running one (the
        run was declared dead or relaunched): the caller's progress is not recorded.
    """
    if "state" in fields:
        raise ValueError("record_progress changes progress, not the state; use transition().")
    with status_lock(run_dir):
        current = read_status(run_dir)
        damaged = current.state is State.UNKNOWN or (current.state is State.RUNNING and current.launch_id is None)
        if damaged and last_known is not None and last_known.launch_id == launch_id:
            current = last_known
        elif current.state is not State.RUNNING or current.launch_id != launch_id:
            return None
        return _write(run_dir, current.with_changes(heartbeat=time.time(), **fields))


class LaunchStatus:
    """A worker's handle on the status of its own launch: begin, progress, heartbeat, end.

    It keeps the last status it wrote, so it can repair a file damaged while it runs, and
    it notices when its launch is no longer current (`superseded`), after which it writes
    nothing more.
    """

    HEARTBEAT_SECONDS = 1.0

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.launch_id: Optional[str] = None
        self.last: Optional[RunStatus] = None
        self.superseded = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def begin(self, pid: int, host: str, launch_id: Optional[str] = None) -> RunStatus:
        """Takes the run over for this worker process.

        Args:
            pid, host: This worker process.
            launch_id: The launch this worker was started for (by the supervisor), which it
                adopts; None for a worker started directly (`python -m engine worker` or
                `train`, `run_training`): a queued run is moved to running, a stopped or
                failed one is resumed (back to queued, then running), a running one whose
                worker is gone is taken over.

        Raises:
            IllegalTransition: the run is finished, its status is unreadable, or the launch
                this worker was started for is no longer the current one.
        """
        with status_lock(self.run_dir):
            current = read_status(self.run_dir)
            now = time.time()
            start = dict(pid=pid, host=host, started=now_iso(), error=None, finished=None, heartbeat=now,
                         stage=Stage.STARTING, message="Starting.")
            if launch_id is not None:
                if current.state is not State.RUNNING or current.launch_id != launch_id:
                    raise IllegalTransition(f"Run {current.run_id} is {current.state} under another launch; "
                                            "this worker's launch is no longer current.")
                status = current.with_changes(**start)
            elif current.state is State.RUNNING and current.launch_id:
                status = current.with_changes(**start)
            else:
                if current.state in (State.STOPPED, State.FAILED):
                    _check_move(current, State.QUEUED, None, None)
                    current = current.with_changes(state=State.QUEUED, resumed=current.resumed + 1, queued_at=now)
                _check_move(current, State.RUNNING, None, None)
                status = current.with_changes(state=State.RUNNING, launch_id=new_launch_id(), launched_at=now,
                                              **start)
            self.launch_id = status.launch_id
            self.last = _write(self.run_dir, status)
            return self.last

    def update(self, **fields: Any) -> None:
        """Records progress of this launch (nothing once it is superseded)."""
        with self._lock:
            if self.superseded or self.launch_id is None:
                return
            written = record_progress(self.run_dir, self.launch_id, self.last, **fields)
            if written is None:
                self.superseded = True
            else:
                self.last = written

    def finish(self, state: State, message: str, **fields: Any) -> Optional[RunStatus]:
        """Ends this launch in `state` (finished, stopped or failed); None when it was superseded."""
        with self._lock:
            try:
                self.last = transition(self.run_dir, state, stage=Stage.DONE, message=message,
                                       for_launch=self.launch_id, finished=now_iso(), pid=None,
                                       eta_seconds=0 if state is not State.FAILED else None, **fields)
                return self.last
            except IllegalTransition:
                self.superseded = True
                return None

    def start_heartbeat(self) -> None:
        """Refreshes the heartbeat every HEARTBEAT_SECONDS until `stop_heartbeat`.

        In its own thread, so the status stays fresh while the worker is busy in one long
        call (building a model, decoding images).
        """
        def beat():
            while not self._stop.wait(self.HEARTBEAT_SECONDS):
                try:
                    self.update()
                except OSError:
                    pass  # A full disk must not kill the worker; the next beat tries again.

        self._thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        """Stops the heartbeat thread."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
