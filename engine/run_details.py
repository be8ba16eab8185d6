"""Runs people can find: a default human name, a description and tags (edited by the run's owner),
and the filters and orders the run lists offer.

The name, description and tags live in the run's `status.json` (written only through
`engine.status.edit_summary`), so a listing of a thousand runs reads them with the status it
already reads, and they travel with the run folder.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Iterable, Optional

from engine import audit
from engine.status import RunStatus, edit_summary, read_status
from engine.users import User

MAXIMUM_NAME = 120
MAXIMUM_DESCRIPTION = 2000
MAXIMUM_TAGS = 20
MAXIMUM_TAG = 40
SORT_ORDERS = ("newest", "oldest", "best accuracy", "name")


def default_name(dataset: str, backbone: str, when: Optional[datetime.datetime] = None) -> str:
    """"dataset · backbone · short time", e.g. "cats_vs_dogs · MobileNet · 11-30 15:04"."""
    when = when or datetime.datetime.now()
    folder = Path(str(dataset).rstrip("/")).name or str(dataset)
    if str(dataset).startswith("tfds:"):
        folder = str(dataset)[len("tfds:"):]
    return f"{folder} · {backbone} · {when:%m-%d %H:%M}"


def clean_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Tags as stored: trimmed, inner spaces collapsed, lower case, no repeats, in the order given.

    Raises:
        ValueError: a tag longer than MAXIMUM_TAG characters or containing a comma, or more than
            MAXIMUM_TAGS tags.
    """
    cleaned: list[str] = []
    for tag in tags:
        tag = " ".join(str(tag).split()).lower()
        if not tag:
            continue
        if "," in tag:
            raise ValueError(f"A tag cannot contain a comma (commas separate tags); received {tag!r}.")
        if len(tag) > MAXIMUM_TAG:
            raise ValueError(f"A tag must have at most {MAXIMUM_TAG} characters; received {tag!r} ({len(tag)}).")
        if tag not in cleaned:
            cleaned.append(tag)
    if len(cleaned) > MAXIMUM_TAGS:
        raise ValueError(f"A run can have at most {MAXIMUM_TAGS} tags; received {len(cleaned)}.")
    return tuple(cleaned)


def describe(run: str, runs_dir: Optional[str | os.PathLike] = None, user: Optional[User] = None, *,
             name: Optional[str] = None, description: Optional[str] = None, tags: Optional[Iterable[str]] = None,
             source: str = "python") -> RunStatus:
    """Sets a run's name, description and/or tags (those given); its owner or an admin, in any state.

    Raises:
        PermissionError: the user neither owns the run nor is an admin (or is a viewer).
        ValueError: a name that is empty or longer than 120 characters, a description longer than
            2,000, or a bad tag (see `clean_tags`); nothing is changed then.
    """
    from engine.jobs import authorize
    from engine.runs import resolve_run

    run_dir = resolve_run(run, runs_dir)
    user = authorize(user, read_status(run_dir), "describe")
    changes: dict = {}
    if name is not None:
        name = " ".join(str(name).split())
        if not name or len(name) > MAXIMUM_NAME:
            raise ValueError(f"A run's name must have 1 to {MAXIMUM_NAME} characters; received {len(name)}.")
        changes["name"] = name
    if description is not None:
        description = str(description).strip()
        if len(description) > MAXIMUM_DESCRIPTION:
            raise ValueError(f"A description must have at most {MAXIMUM_DESCRIPTION} characters; "
                             f"received {len(description)}.")
        changes["description"] = description
    if tags is not None:
        changes["tags"] = clean_tags(tags)
    if not changes:
        return read_status(run_dir)
    status = edit_summary(run_dir, **changes)
    audit.record(run_dir.parent, user, "describe", run_dir.name, source,
                 {key: list(value) if isinstance(value, tuple) else value for key, value in changes.items()})
    return status


def filter_runs(runs: Iterable[RunStatus], *, owner: Optional[str] = None, dataset: Optional[str] = None,
                backbone: Optional[str] = None, state: Optional[str] = None, tag: Optional[str] = None,
                text: Optional[str] = None) -> list[RunStatus]:
    """The runs matching every filter given (None or "" leaves a filter out).

    Args:
        owner: The owner's id or display name.
        dataset: The dataset path as listed.
        backbone, state: Exact values (state as its text, e.g. "finished").
        tag: One tag the run must carry (any case).
        text: Words that must all appear, in any case, in the run's id, name, description, tags,
            dataset or backbone.
    """
    words = str(text or "").lower().split()
    wanted_tag = " ".join(str(tag or "").split()).lower()
    chosen = []
    for run in runs:
        if owner and owner not in (run.owner, run.owner_name):
            continue
        if dataset and run.dataset != dataset:
            continue
        if backbone and run.backbone != backbone:
            continue
        if state and run.state.value != state:
            continue
        if wanted_tag and wanted_tag not in run.tags:
            continue
        if words:
            haystack = " ".join([run.run_id, run.name, run.description, " ".join(run.tags), run.dataset or "",
                                 run.backbone or ""]).lower()
            if not all(word in haystack for word in words):
                continue
        chosen.append(run)
    return chosen


def sort_runs(runs: Iterable[RunStatus], order: str = "newest") -> list[RunStatus]:
    """Runs in one of SORT_ORDERS; runs without an accuracy go last under "best accuracy".

    Raises:
        ValueError: an order that is not one of SORT_ORDERS.
    """
    runs = list(runs)
    if order == "newest":
        return sorted(runs, key=lambda run: (run.created or "", run.run_id), reverse=True)
    if order == "oldest":
        return sorted(runs, key=lambda run: (run.created or "", run.run_id))
    if order == "best accuracy":
        return sorted(runs, key=lambda run: (run.best_val_accuracy is None, -(run.best_val_accuracy or 0.0),
                                             run.run_id))
    if order == "name":
        return sorted(runs, key=lambda run: ((run.name or run.run_id).lower(), run.run_id))
    raise ValueError(f"`order` must be one of {', '.join(SORT_ORDERS)}; received {order!r}.")
