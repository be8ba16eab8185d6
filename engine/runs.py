"""Run folders: create them, find them and read them back.

`runs/<run_id>/` is the contract between the worker that trains and everything that
shows a run (CLI, dashboard); see docs/architecture.md. Reading here never writes:
a run whose worker died is turned `failed` by `engine.jobs.reconcile`, not by a reader.
Listing reads one small `status.json` per run, which carries what lists show.
This module never imports TensorFlow.
"""

from __future__ import annotations

import datetime
import os
import secrets
import threading
from pathlib import Path
from typing import Optional

from engine import runfiles
from engine.config import RunConfig
from engine.locations import runs_root
from engine.run_details import default_name
from engine.status import RunStatus, State, create_status, read_status
from engine.users import User, local_user

__all__ = ["create_run", "default_runs_dir", "get_run", "list_runs", "listing_signature", "new_run_id",
           "read_status", "resolve_run", "run_folders", "RunStatus", "State"]


def default_runs_dir() -> Path:
    """The runs root: `$TRANSFER_STUDIO_RUNS`, else `runs/` in the current folder (see engine.locations)."""
    return runs_root()


def new_run_id(config: RunConfig) -> str:
    """A sortable, unique, readable id: time, backbone and a random suffix."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    label = "".join(character for character in (config.name or config.model.backbone)
                    if character.isalnum() or character in "-_")[:24] or "run"
    return f"{stamp}-{label}-{secrets.token_hex(2)}"


def create_run(config: RunConfig, runs_dir: Optional[str | os.PathLike] = None, owner: Optional[User] = None) -> Path:
    """Creates `runs/<run_id>/` with `config.json` and a `queued` status; returns the folder.

    Args:
        config: The run's settings.
        runs_dir: The runs root (default `default_runs_dir()`).
        owner: Who starts the run (default: the local user); it never changes afterwards.
    """
    owner = owner or local_user()
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
    # An unnamed run still gets a name people can find it by: "dataset · backbone · 11-30 15:04".
    name = config.name or default_name(config.data.path, config.model.backbone)
    create_status(run_dir, owner=owner.id, owner_name=owner.name, name=name, backbone=config.model.backbone,
                  dataset=config.data.path,
                  epochs=config.training.epochs + (config.fine_tuning.epochs if config.fine_tuning.enabled else 0))
    return run_dir


def get_run(run_dir: str | os.PathLike) -> RunStatus:
    """One run's status and list summary; never raises on half-written or corrupt files, never writes."""
    return read_status(run_dir)


def run_folders(runs_dir: Optional[str | os.PathLike] = None) -> list[Path]:
    """Every run folder under the runs root (folders holding a `config.json`), newest first."""
    root = Path(runs_dir or default_runs_dir())
    if not root.is_dir():
        return []
    folders = [entry for entry in root.iterdir()
               if entry.is_dir() and not entry.name.startswith(".") and (entry / runfiles.CONFIG_FILE).is_file()]
    return sorted(folders, key=lambda entry: entry.name, reverse=True)


def listing_signature(runs_dir: Optional[str | os.PathLike] = None) -> tuple:
    """What a cached run listing depends on: each run folder's name and its status.json's change time.

    One `stat` per run, no file read, so a page can tell in milliseconds whether its
    cached listing is still true.
    """
    root = Path(runs_dir or default_runs_dir())
    signature = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return ()
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            details = os.stat(Path(entry.path) / runfiles.STATUS_FILE)
            # An atomic replace gives the file a new inode: two writes within one tick of a
            # coarse clock (NFS) still differ.
            signature.append((entry.name, (details.st_mtime_ns, details.st_ino, details.st_size)))
        except OSError:
            signature.append((entry.name, None))
    return tuple(sorted(signature))


class RunListing:
    """The runs under one root, kept current by re-reading only what changed.

    Each call stats every `status.json` (`listing_signature`, milliseconds for a thousand
    runs); when nothing changed it returns the same tuple, and when one run changed (a
    heartbeat every second while it trains) it reads that one file again. Safe to share
    between threads (the dashboard shares one per runs root among its sessions).
    """

    def __init__(self, runs_dir: str | os.PathLike):
        self.root = Path(runs_dir)
        self._lock = threading.Lock()
        self._signature: Optional[tuple] = None
        self._runs: tuple[RunStatus, ...] = ()
        self._read: dict[str, tuple] = {}

    def runs(self) -> tuple[RunStatus, ...]:
        """Every run's status, newest first, as `list_runs` gives it."""
        signature = listing_signature(self.root)
        with self._lock:
            if signature != self._signature:
                read = {}
                for name, modified in signature:
                    folder = self.root / name
                    if not (folder / runfiles.CONFIG_FILE).is_file():
                        continue
                    earlier = self._read.get(name)
                    read[name] = earlier if earlier and earlier[0] == modified and modified else \
                        (modified, read_status(folder))
                self._read = read
                self._runs = tuple(read[name][1] for name in sorted(read, reverse=True))
                self._signature = signature
            return self._runs


def list_runs(runs_dir: Optional[str | os.PathLike] = None) -> list[RunStatus]:
    """The status of every run under the runs root, newest first (one small file read per run)."""
    return [read_status(folder) for folder in run_folders(runs_dir)]


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
