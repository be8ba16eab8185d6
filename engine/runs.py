"""Run folders: create them, keep their status, and read them back.

`runs/<run_id>/` is the contract between the worker that trains and everything
that shows a run (CLI, dashboard). This module never imports TensorFlow, so
listing and reading runs is fast.
"""

from __future__ import annotations

import datetime
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Optional

from engine import runfiles
from engine.config import RunConfig

STATES = ("queued", "running", "finished", "failed", "stopped")
FINAL_STATES = ("finished", "failed", "stopped")
HEARTBEAT_SECONDS = 1.0


def default_runs_dir() -> Path:
    """The runs root: `$TRANSFER_STUDIO_RUNS`, else `runs/` in the current folder."""
    return Path(os.environ.get("TRANSFER_STUDIO_RUNS") or "runs")


def now_iso() -> str:
    """The current UTC time as ISO 8601 text."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_run_id(config: RunConfig) -> str:
    """A sortable, unique, readable id: time, backbone and a random suffix."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    label = "".join(character for character in (config.name or config.model.backbone)
                    if character.isalnum() or character in "-_")[:24] or "run"
    return f"{stamp}-{label}-{secrets.token_hex(2)}"


def create_run(config: RunConfig, runs_dir: Optional[str | os.PathLike] = None) -> Path:
    """Creates `runs/<run_id>/` with `config.json` and a `queued` status; returns the folder."""
    root = Path(runs_dir or default_runs_dir())
    root.mkdir(parents=True, exist_ok=True)
    while True:
        run_dir = root / new_run_id(config)
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            continue
    config.save(run_dir / runfiles.CONFIG_FILE)
    runfiles.atomic_write_json(run_dir / runfiles.STATUS_FILE, {
        "run_id": run_dir.name,
        "state": "queued",
        "phase": "queued",
        "message": "Waiting to start.",
        "created": now_iso(),
        "queued_at": time.time(),
        "heartbeat": time.time(),
    })
    return run_dir


class StatusWriter:
    """Keeps `status.json` current: updates from the training code plus a heartbeat thread.

    The heartbeat runs in its own thread so that the status stays fresh while the
    worker is busy in a long call (building a model, decoding images).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / runfiles.STATUS_FILE
        self._lock = threading.Lock()
        self._status: dict[str, Any] = runfiles.read_json(self.path, {}) or {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def update(self, **fields: Any) -> dict:
        """Merges fields into the status and writes it at once, with a fresh heartbeat."""
        with self._lock:
            self._status.update(fields)
            self._status["heartbeat"] = time.time()
            self._status["heartbeat_iso"] = now_iso()
            runfiles.atomic_write_json(self.path, self._status)
            return dict(self._status)

    @property
    def status(self) -> dict:
        """A copy of the current status."""
        with self._lock:
            return dict(self._status)

    def start_heartbeat(self) -> None:
        """Starts refreshing the heartbeat every HEARTBEAT_SECONDS until `stop_heartbeat`."""
        def beat():
            while not self._stop.wait(HEARTBEAT_SECONDS):
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


def read_status(run_dir: str | os.PathLike) -> dict:
    """The run's status; a missing or corrupt file reads as state 'unknown'."""
    status = runfiles.read_json(Path(run_dir) / runfiles.STATUS_FILE)
    if not isinstance(status, dict) or status.get("state") not in STATES:
        return {"state": "unknown", "message": "status.json is missing or unreadable."}
    return status


def best_validation_accuracy(metrics: list[dict]) -> Optional[float]:
    """The highest per-epoch validation accuracy in a run's metrics, if any."""
    values = [event.get("val_accuracy") for event in metrics if event.get("type") == "epoch"]
    values = [value for value in values if isinstance(value, (int, float))]
    return max(values) if values else None


def get_run(run_dir: str | os.PathLike) -> dict:
    """A summary of one run for lists and pages; never raises on half-written or corrupt files."""
    from engine.jobs import refresh

    run_dir = Path(run_dir)
    # refresh() also turns a run whose worker died into `failed`, so no reader ever shows it running.
    status = refresh(run_dir)
    config = runfiles.read_json(run_dir / runfiles.CONFIG_FILE) or {}
    metrics = runfiles.read_jsonl(run_dir / runfiles.METRICS_FILE)
    model = config.get("model", {}) if isinstance(config, dict) else {}
    data = config.get("data", {}) if isinstance(config, dict) else {}
    return {
        "run_id": run_dir.name,
        "path": str(run_dir),
        "state": status.get("state", "unknown"),
        "phase": status.get("phase"),
        "epoch": status.get("epoch"),
        "epochs": status.get("epochs"),
        "message": status.get("message", ""),
        "backbone": model.get("backbone") if isinstance(model, dict) else None,
        "dataset": data.get("path") if isinstance(data, dict) else None,
        "best_val_accuracy": best_validation_accuracy(metrics),
        "created": status.get("created"),
        "heartbeat": status.get("heartbeat"),
    }


def list_runs(runs_dir: Optional[str | os.PathLike] = None) -> list[dict]:
    """Summaries of every run folder under the runs root, newest first."""
    root = Path(runs_dir or default_runs_dir())
    if not root.is_dir():
        return []
    folders = [entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    return [get_run(folder) for folder in sorted(folders, key=lambda entry: entry.name, reverse=True)]


def resolve_run(run: str, runs_dir: Optional[str | os.PathLike] = None) -> Path:
    """Finds a run folder from a path or a run id (or a unique prefix of one).

    Raises:
        ValueError: no run or more than one run matches.
    """
    candidate = Path(run)
    if (candidate / runfiles.CONFIG_FILE).is_file():
        return candidate
    root = Path(runs_dir or default_runs_dir())
    if (root / run / runfiles.CONFIG_FILE).is_file():
        return root / run
    matches = sorted(entry for entry in root.glob(f"{run}*") if entry.is_dir()) if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ValueError(f"Run {run!r} is ambiguous: {', '.join(match.name for match in matches[:5])}.")
    raise ValueError(f"No run {run!r}: not a run folder, nor a run id under {root}. See `python -m engine runs`.")
