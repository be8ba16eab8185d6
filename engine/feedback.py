"""Feedback from a demo: "the model was right / wrong about this picture", kept for the run's owner.

Anybody who can see a run may send feedback on it, viewers included: feedback changes
nothing the model learns from. It is kept beside the run, never in the training data, until
the owner (or an admin) has looked at it and marked it resolved; what to do with the picture
then (add it to the data, throw it away) is their decision, made by hand.

Layout inside the run folder:

- `feedback/<id>.<ext>`: a copy of each picture, exactly as it was sent;
- `feedback.jsonl`: only ever appended to, one JSON line per event, like `metrics.jsonl`:
  `{"type": "feedback", "id", "time", "user", "user_name", "role", "image", "predicted",
  "correct", "note"}` when feedback arrives, `{"type": "resolved", "id", "time", "user",
  "user_name"}` when the owner has reviewed it.

This module never imports TensorFlow or Streamlit.
"""

from __future__ import annotations

import io
import os
import secrets
import time
from pathlib import Path
from typing import Optional

from PIL import Image, UnidentifiedImageError

from engine import runfiles
from engine.status import State, now_iso, read_status
from engine.users import User, local_user

FEEDBACK_FILE = "feedback.jsonl"
FEEDBACK_FOLDER = "feedback"
# A phone photo is a few megabytes; anything much larger is not a picture someone just took.
MAX_IMAGE_BYTES = 10 * 1024 * 1024
# The formats a camera or a browser sends, with the extension the copy is saved under.
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}


def _image_extension(image_bytes: bytes) -> str:
    """The file extension for these bytes, after checking they are a picture of a known format.

    Raises:
        ValueError: empty, too large, not a picture, or a format that is not accepted.
    """
    if not image_bytes:
        raise ValueError("The picture is empty (0 bytes); nothing was sent.")
    if len(image_bytes) > MAX_IMAGE_BYTES:
        raise ValueError(f"The picture is {len(image_bytes) / 1024 / 1024:.1f} MB; feedback takes pictures of at most "
                         f"{MAX_IMAGE_BYTES // 1024 // 1024} MB. Send a smaller one.")
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image_format = image.format
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"The file sent as feedback is not a picture that can be read ({error}).") from error
    if image_format not in EXTENSIONS:
        raise ValueError(f"Feedback takes JPEG, PNG, GIF, BMP or WebP pictures; received {image_format}.")
    return EXTENSIONS[image_format]


def _run_classes(run_dir: Path) -> list[str]:
    labels = runfiles.read_json(run_dir / runfiles.LABELS_FILE)
    return list(labels.get("classes", [])) if isinstance(labels, dict) else []


def record_feedback(run_dir: str | os.PathLike, image_bytes: bytes, predicted: str, correct: bool,
                    user: Optional[User] = None, note: Optional[str] = None) -> dict:
    """Keeps one picture and whether the model's answer for it was right, for the owner to review.

    Any user who can see the run may call this, viewers included: nothing the model learns
    from changes.

    Args:
        run_dir: The run the picture was shown to.
        image_bytes: The picture, as it was sent (at most 10 MB).
        predicted: The class the model answered (one of the run's classes).
        correct: Whether the person said the answer was right.
        user: Who sends it (default: the local user).
        note: Anything the person added (optional).

    Returns:
        The feedback entry as written to `feedback.jsonl`.

    Raises:
        ValueError: the run has no trained model, `predicted` is not one of its classes, or the
            picture is empty, too large or unreadable; the message says which.
    """
    run_dir = Path(run_dir)
    if read_status(run_dir).state is State.UNKNOWN or not (run_dir / runfiles.MODEL_FILE).is_file():
        raise ValueError(f"{run_dir} is not a trained run (no readable status.json and model.keras); "
                         "feedback goes to a run with a model.")
    classes = _run_classes(run_dir)
    if predicted not in classes:
        raise ValueError(f"`predicted` must be one of the run's classes ({', '.join(classes)}); "
                         f"received {predicted!r}.")
    if not isinstance(correct, bool):
        raise ValueError(f"`correct` must be true or false; received {correct!r}.")
    extension = _image_extension(image_bytes)
    user = user or local_user()
    feedback_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
    image_name = f"{FEEDBACK_FOLDER}/{feedback_id}{extension}"
    # The picture first: a line in the log never points at a picture that is not there.
    runfiles.atomic_write_bytes(run_dir / image_name, image_bytes)
    entry = {"type": "feedback", "id": feedback_id, "time": now_iso(), "user": user.id, "user_name": user.name,
             "role": user.role.value, "image": image_name, "predicted": predicted, "correct": correct,
             "note": (note or "").strip() or None}
    runfiles.append_jsonl(run_dir / FEEDBACK_FILE, [entry])
    return entry


def list_feedback(run_dir: str | os.PathLike, unresolved_only: bool = False) -> list[dict]:
    """The feedback on a run, newest first, each with `resolved` (bool), and when resolved `resolved_by`, `resolved_at`.

    Each item also has `image_path`, the absolute path of its picture. A cut-short last
    line (a full disk) is skipped, as `metrics.jsonl` readers do.

    Args:
        run_dir: The run folder.
        unresolved_only: Leave out what the owner already resolved.
    """
    run_dir = Path(run_dir)
    items: dict[str, dict] = {}
    for record in runfiles.read_jsonl(run_dir / FEEDBACK_FILE):
        if record.get("type") == "feedback" and isinstance(record.get("id"), str):
            items[record["id"]] = {**record, "resolved": False, "image_path": str(run_dir / str(record.get("image")))}
        elif record.get("type") == "resolved" and record.get("id") in items:
            items[record["id"]].update(resolved=True, resolved_by=record.get("user_name") or record.get("user"),
                                       resolved_at=record.get("time"))
    # Newest first by the order of the log (times have whole seconds, the order is exact).
    return [item for item in reversed(items.values()) if not (unresolved_only and item["resolved"])]


def resolve_feedback(run_dir: str | os.PathLike, feedback_id: str, user: Optional[User] = None) -> dict:
    """Marks one piece of feedback as reviewed; only the run's owner or an admin may.

    The picture stays where it is: resolving records that somebody looked, and adds nothing
    to any training data.

    Args:
        run_dir: The run folder.
        feedback_id: The `id` of an entry of `list_feedback`.
        user: Who resolves it (default: the local user).

    Returns:
        The entry, as `list_feedback` now lists it. Resolving twice changes nothing.

    Raises:
        PermissionError: a viewer, or a member who does not own the run.
        ValueError: no feedback with that id on this run.
    """
    from engine.jobs import authorize

    run_dir = Path(run_dir)
    user = authorize(user, read_status(run_dir), "review feedback on")
    current = {item["id"]: item for item in list_feedback(run_dir)}
    if feedback_id not in current:
        raise ValueError(f"Run {run_dir.name} has no feedback with id {feedback_id!r} (see {FEEDBACK_FILE}).")
    if not current[feedback_id]["resolved"]:
        runfiles.append_jsonl(run_dir / FEEDBACK_FILE, [{"type": "resolved", "id": feedback_id, "time": now_iso(),
                                                         "user": user.id, "user_name": user.name}])
    return {item["id"]: item for item in list_feedback(run_dir)}[feedback_id]
