"""Reading and writing the files of a run folder safely.

Writers replace whole files atomically (temporary file, then `os.replace`), so a
reader never sees half a JSON document; `metrics.jsonl` is only appended, and a
reader skips a line that is cut short or corrupt instead of failing.
This module never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
from collections import deque
import csv
import errno
import glob
import io
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
DATA_REPORT_FILE = "data_report.json"
SPLIT_FILE = "split.csv"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
EVALUATION_FILE = "evaluation.json"
PREDICTIONS_FILE = "predictions.csv"
# The run's operating point (threshold, minimum confidence): engine.operating_point writes it.
DECISION_FILE = "decision.json"
LOG_FILE = "worker.log"
# Control files: a request to stop cooperatively, or a note that a kill was asked for.
STOP_REQUEST_FILE = "stop.request"
KILL_REQUEST_FILE = "kill.request"
# Saved after every epoch, so a stopped or failed run resumes where it was.
CHECKPOINT_MODEL_FILE = "checkpoint.keras"
CHECKPOINT_STATE_FILE = "checkpoint.json"
BEST_MODEL_FILE = "best.keras"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive `flock` on `path` (created if missing), waiting for it: one holder at a time, across processes."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temporary_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(file_descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary_name, path)
    except BaseException:
        # Leave no temporary file behind when the write fails (disk full, interrupt).
        if os.path.exists(temporary_name):
            os.unlink(temporary_name)
        raise


def write_through_temporary(path: str | os.PathLike, write) -> None:
    """Calls `write(temporary_path)`, then renames the result onto `path` in one step.

    For writers that need a file name (Keras saves): the temporary name keeps the full
    suffix (`.keras`, `.weights.h5`) that such writers check.
    """
    path = Path(path)
    temporary = path.with_name(f".{os.getpid()}.{path.name}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes a text file atomically, encoded as UTF-8.

    A file name that is not valid UTF-8 reaches Python as surrogate escapes; it is written
    back as its original bytes (and `read_csv` reads it so), so such a file still trains.
    """
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes `data` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays reach us from metrics; they serialise as plain numbers.
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, TypeError):
            pass
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serialisable")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """Reads a JSON file, returning `default` when it is missing, empty or corrupt."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError, UnicodeDecodeError):
        return default


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Appends one JSON document per line; each line is written with a single `write` call."""
    lines = "".join(json.dumps(record, default=_json_default) + "\n" for record in records)
    if not lines:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(lines)
        handle.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads every complete, valid JSON line; skips a half-written or corrupt line."""
    records: list[dict] = []
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    # The writer is still in the middle of this line.
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        pass
    return records


def write_csv(path: str | os.PathLike, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """Writes a CSV file atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Reads a CSV file into dictionaries; a missing or unreadable file gives an empty list."""
    try:
        with open(path, "r", encoding="utf-8", errors="surrogateescape", newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def process_tag() -> str:
    """`<host>-<pid>`, for naming a temporary file after the process that writes it."""
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_orphaned_temporaries(folder: str | os.PathLike, prefix: str) -> None:
    """Deletes temporaries named `<prefix><host>-<pid>…` whose process on this host has ended.

    A process killed while writing a large cache file (an image array can be gigabytes)
    leaves its temporary behind; the next writer of the same entry clears it. Files of
    live processes and of other hosts (a cache on shared storage) are left alone.
    """
    host = socket.gethostname()
    for path in Path(folder).glob(f"{glob.escape(prefix)}{glob.escape(host)}-*"):
        pid_text = path.name[len(prefix) + len(host) + 1:].split(".")[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            try:
                path.unlink()
            except OSError:
                pass  # Another process cleared it first.


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Test-only fault injection, read in `fault_point` alone; never set it outside tests.
# "POINT:pause[:RELEASE_FILE]" holds the process at POINT until RELEASE_FILE exists (or until
# it is killed); "POINT:fail" raises a simulated disk error there; "POINT:sleep:SECONDS" waits
# there, so that tests which stop or kill a run mid-way are not racing epochs that take a
# fraction of a second. POINT is "decoding" (every decoding thread, once half of the images
# are decoded into the cache), "saving" (model.keras written under its temporary name, not yet
# renamed) or "epoch_end" (after each epoch's event is written). Several faults are
# separated by commas: "saving:fail,epoch_end:sleep:0.2".
FAULT_VARIABLE = "TRANSFER_STUDIO_FAULT"


def fault_point(point: str) -> None:
    """Pauses, sleeps or fails here when `$TRANSFER_STUDIO_FAULT` names this point (tests only)."""
    for fault in os.environ.get(FAULT_VARIABLE, "").split(","):
        name, _, rest = fault.partition(":")
        if name == point:
            _inject(point, *rest.partition(":")[::2])


def _inject(point: str, action: str, release: str) -> None:
    if action == "fail":
        raise OSError(errno.ENOSPC, f"No space left on device (simulated by {FAULT_VARIABLE} at {point})")
    if action == "sleep":
        time.sleep(float(release or 0))
        return
    if action == "pause":
        logger = logging.getLogger("engine.faults")
        logger.warning("%s: paused at %s.", FAULT_VARIABLE, point)
        while not (release and os.path.exists(release)):
            time.sleep(0.05)
        logger.warning("%s: released at %s.", FAULT_VARIABLE, point)



def log_tail(run_dir: str | os.PathLike, lines: int = 40) -> str:
    """The last lines of a run's `worker.log`, without TensorFlow's start-up noise ("" when there is none)."""
    path = Path(run_dir) / LOG_FILE
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            useful = (line for line in handle if not line.startswith(("I0000", "E0000", "W0000", "WARNING: All log")))
            return "".join(deque(useful, maxlen=lines))
    except OSError:
        return ""
