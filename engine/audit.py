"""The audit trail: who started, stopped, killed, resumed, renamed, deleted or restored which run.

`<runs root>/audit.jsonl` is only ever appended to, one JSON line per action, with a single
`write` on a file opened in append mode, so concurrent writers (pages, the CLI, several
server processes) interleave whole lines and nothing is rewritten. A line that is cut
short (a full disk) is skipped by readers, like `metrics.jsonl`'s.

This module never imports TensorFlow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from engine import runfiles
from engine.status import now_iso
from engine.users import User

AUDIT_FILE = "audit.jsonl"
ACTIONS = ("start", "stop", "kill", "resume", "rename", "delete", "restore", "set_max_concurrent",
           "move_to_front", "set_operating_point",
           "set_intended_use", "export", "describe")


def record(runs_dir: str | os.PathLike, user: User, action: str, run_id: str = "", source: str = "python",
           detail: Optional[dict] = None) -> dict:
    """Appends one action to the runs root's audit log and returns the entry.

    Args:
        runs_dir: The runs root.
        user: Who acted.
        action: One of ACTIONS.
        run_id: The run acted on ("" for actions on the queue).
        source: Where from: "page", "cli" or "python".
        detail: Anything else worth keeping (a new name, a count).
    """
    if action not in ACTIONS:
        raise ValueError(f"Unknown audit action {action!r}; known: {', '.join(ACTIONS)}.")
    entry = {"time": now_iso(), "user": user.id, "user_name": user.name, "role": user.role.value,
             "action": action, "run": run_id, "source": source}
    if detail:
        entry["detail"] = detail
    root = Path(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    # O_APPEND: every write lands at the end, whoever else appends; one write per line.
    descriptor = os.open(root / AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)
    return entry


def read(runs_dir: str | os.PathLike) -> list[dict]:
    """Every complete entry of the runs root's audit log, oldest first."""
    return runfiles.read_jsonl(Path(runs_dir) / AUDIT_FILE)
