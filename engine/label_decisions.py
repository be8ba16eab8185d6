"""What the user decided about labels that look wrong: leave an image out of the next run, or move it to another class.

The decisions of one dataset folder are a list kept in the app's state, never in the data
folder (which may be read-only, as the shared data are) and never by moving or deleting the
user's files. The list lives under the app's data folder (`engine.locations.data_dir()`,
`label-decisions/<digest of the resolved folder>.json`), not under the cache root: the cache
may be wiped at any time, and a decision must survive that.

Each entry is {"path", "action": "leave_out" | "move", "to": class or None, "by": user id,
"by_name", "time"}; a path has at most one decision (the latest), and undoing removes it.
`engine.data.scan_dataset` applies the list after every scan (`apply_decisions`), so the next
run trains without the left-out images, with the moved ones under their new class, and its
`data_report.json` lists both. Viewers may not record or undo decisions. This module never
imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Optional

from engine import locations
from engine.runfiles import atomic_write_json, exclusive_lock, read_json
from engine.users import Role, User, local_user

LEAVE_OUT = "leave_out"
MOVE = "move"
ACTIONS = (LEAVE_OUT, MOVE)
DECISIONS_FOLDER = "label-decisions"
DECISIONS_VERSION = 1
LEFT_OUT_REASON = "left out: marked as a wrong label on the Data page"


def _resolved_root(root: str | os.PathLike) -> Path:
    return Path(root).expanduser().resolve()


def decisions_file(root: str | os.PathLike) -> Path:
    """Where the decisions about the dataset folder `root` are kept (the file may not exist yet).

    Under the app's data folder, so that clearing the cache does not lose them; named by a
    digest of the resolved folder, so every way of writing the same folder finds the same list.
    """
    text = str(_resolved_root(root))
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return locations.data_dir().expanduser().resolve() / DECISIONS_FOLDER / f"{digest}.json"


def read_decisions(root: str | os.PathLike) -> list[dict]:
    """The decisions recorded for the dataset folder `root`, oldest first (empty when there are none)."""
    stored = read_json(decisions_file(root)) or {}
    entries = stored.get("decisions", []) if isinstance(stored, dict) else []
    return [entry for entry in entries if isinstance(entry, dict) and entry.get("action") in ACTIONS
            and isinstance(entry.get("path"), str)]


def decisions_stamp(root: str | os.PathLike) -> str:
    """A short text that changes whenever the decisions of `root` change (for caches keyed on the scan)."""
    try:
        info = decisions_file(root).stat()
    except OSError:
        return "none"
    return f"{info.st_size}-{info.st_mtime_ns}"


def _check_may_decide(user: Optional[User]) -> User:
    user = user or local_user()
    if user.role is Role.VIEWER:
        raise PermissionError(f"{user.name} is a viewer: viewers see the labels but cannot change "
                              "which images the next run uses.")
    return user


def _update(root: str | os.PathLike, change) -> list[dict]:
    """Applies `change(entries) -> entries` under the list's lock and saves the result atomically."""
    path = decisions_file(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two people deciding at once must not lose one another's decision: read, change and write under one lock.
    with exclusive_lock(path.with_suffix(".lock")):
        entries = change(read_decisions(root))
        atomic_write_json(path, {"version": DECISIONS_VERSION, "root": str(_resolved_root(root)),
                                 "decisions": entries})
    return entries


def record_decision(root: str | os.PathLike, path: str | os.PathLike, action: str, to: Optional[str] = None,
                    user: Optional[User] = None) -> dict:
    """Records that the image `path` of the dataset `root` is left out of the next run, or moved to class `to`.

    Nothing on disk is moved or deleted: the decision is applied by the next scan. A new
    decision about the same image replaces the old one.

    Args:
        root: The dataset folder.
        path: An image file inside `root`.
        action: "leave_out" or "move".
        to: The class to move the image to (for "move"); it must be a class folder of `root`.
        user: Who decides (default: the local user); viewers are refused.

    Returns:
        The entry recorded.

    Raises:
        PermissionError: the user is a viewer.
        ValueError: an unknown action, a move without a class or to a class the folder does not
            have, or a path outside `root`.
    """
    user = _check_may_decide(user)
    if action not in ACTIONS:
        raise ValueError(f"`action` must be one of {', '.join(ACTIONS)}; received action={action!r}.")
    resolved_root = _resolved_root(root)
    image = Path(path).expanduser().resolve()
    if resolved_root not in image.parents:
        raise ValueError(f"{str(path)!r} is not inside the dataset folder {str(resolved_root)!r}.")
    if action == MOVE:
        from engine.data import class_names

        classes = class_names(resolved_root)
        if to not in classes:
            raise ValueError(f"Cannot move {image.name} to class {to!r}: the classes of {str(resolved_root)!r} "
                             f"are {', '.join(classes) or 'none'}.")
    else:
        to = None
    entry = {"path": str(image), "action": action, "to": to, "by": user.id, "by_name": user.name,
             "time": time.time()}
    _update(root, lambda entries: [old for old in entries if old["path"] != entry["path"]] + [entry])
    return entry


def undo_decision(root: str | os.PathLike, path: str | os.PathLike, user: Optional[User] = None) -> bool:
    """Removes the decision about the image `path` of `root`; returns whether there was one.

    Raises:
        PermissionError: the user is a viewer.
    """
    _check_may_decide(user)
    image = str(Path(path).expanduser().resolve())
    removed = []

    def without(entries):
        removed.extend(entry for entry in entries if entry["path"] == image)
        return [entry for entry in entries if entry["path"] != image]

    _update(root, without)
    return bool(removed)


def apply_decisions(scan) -> None:
    """Applies the recorded decisions of `scan.root` to a `DatasetScan`, in place.

    A left-out image moves from `files` to `excluded` with the reason `LEFT_OUT_REASON`; a
    moved image takes its new label and is listed in `relabelled`. A decision about a file
    that is no longer in the folder, or a move to a class the folder no longer has, is
    ignored with a warning. Files on disk are never touched.
    """
    decisions = read_decisions(scan.root)
    if not decisions:
        return
    by_path = {entry["path"]: entry for entry in decisions}
    candidates = set(scan.candidates)
    kept = []
    for item in scan.files:
        entry = by_path.get(item.path)
        if entry is None:
            kept.append(item)
        elif entry["action"] == LEAVE_OUT:
            scan.excluded.append({"path": item.path, "label": item.label, "split": item.split,
                                  "reason": f"{LEFT_OUT_REASON} (by {entry.get('by_name') or entry.get('by')})"})
        elif entry.get("to") in scan.classes:
            if entry["to"] != item.label:
                scan.relabelled.append({"path": item.path, "from": item.label, "to": entry["to"], "split": item.split,
                                        "by": entry.get("by_name") or entry.get("by")})
                item.label = entry["to"]
            kept.append(item)
        else:
            scan.warnings.append(f"A decision moves {item.path} to class {entry.get('to')!r}, which this folder "
                                 "does not have; the image keeps its folder's label.")
            kept.append(item)
    scan.files = kept
    for path in sorted(set(by_path) - candidates):
        scan.warnings.append(f"A label decision names {path}, which is no longer in the folder; it is ignored.")
