"""Sharing a demo with a room: the Demo page's address for one run, its QR code, its example pictures.

This module never imports TensorFlow or Streamlit.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from engine import runfiles

DEMO_PAGE = "demo"
# A code this many pixels wide (quiet zone included) still scans from the back of a room
# when projected, and from a laptop screen at arm's length.
QR_TARGET_PIXELS = 480
QR_BORDER_MODULES = 4
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "")


def demo_link(base_url: str, run_id: str) -> str:
    """The address that opens the Demo page on one run: `<app>/demo?run=<run id>`.

    Args:
        base_url: The dashboard's address (`http://host:8501`, `https://host/studio/`), or the
            Demo page's own address; any query or fragment is dropped.
        run_id: The run folder's name; URL-encoded in the link.

    Raises:
        ValueError: the address is not an http(s) address, or the run id is empty.
    """
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"The dashboard's address must start with http:// or https:// and name a host; "
                         f"received {base_url!r}.")
    if not run_id:
        raise ValueError("A demo link needs a run id; received an empty one.")
    path = parts.path.rstrip("/")
    if path.rsplit("/", 1)[-1] == DEMO_PAGE:
        path = path[: -len(DEMO_PAGE) - 1]
    return urlunsplit((parts.scheme, parts.netloc, f"{path}/{DEMO_PAGE}", f"run={quote(run_id, safe='')}", ""))


def only_this_computer(url: str) -> bool:
    """Whether an address can only be opened on the computer that serves it (localhost), not from a phone."""
    host = urlsplit(url).hostname or ""
    return host in LOCAL_HOSTS or host.startswith("127.")


def qr_png(text: str, target_pixels: int = QR_TARGET_PIXELS) -> bytes:
    """A QR code of `text` as a black-on-white PNG, about `target_pixels` wide, for phones to scan.

    Error correction level M (15 % of the code may be unreadable: glare on a projector
    screen) and the standard four-module quiet zone; whole pixels per module, so the
    edges stay sharp when the image is shown at its size.

    Raises:
        ValueError: empty text.
    """
    import segno

    if not text:
        raise ValueError("A QR code needs some text (the demo link); received an empty string.")
    code = segno.make(text, error="m", micro=False)
    width_in_modules = code.symbol_size(scale=1, border=QR_BORDER_MODULES)[0]
    scale = max(4, math.ceil(target_pixels / width_in_modules))
    buffer = io.BytesIO()
    code.save(buffer, kind="png", scale=scale, border=QR_BORDER_MODULES, dark="black", light="white")
    return buffer.getvalue()


def demo_examples(run_dir: str | os.PathLike, count: int = 8) -> list[dict]:
    """Pictures from a run's validation set to try in a demo when there is no camera.

    Taken in turn from each true class (sorted by class, then by file name), so the
    gallery mixes the classes; only files that still exist. Test pictures are used when the
    run has no validation rows.

    Args:
        run_dir: The run folder (its `predictions.csv`).
        count: At most this many.

    Returns:
        Dictionaries with `path` and `true` (the picture's class).
    """
    rows = runfiles.read_csv(Path(run_dir) / runfiles.PREDICTIONS_FILE)
    for split in ("validation", "test"):
        chosen = [row for row in rows if row.get("split") == split and row.get("path") and row.get("true")]
        if chosen:
            break
    per_class: dict[str, list[str]] = {}
    for row in sorted(chosen, key=lambda row: (row["true"], row["path"])):
        if Path(row["path"]).is_file():
            per_class.setdefault(row["true"], []).append(row["path"])
    examples: list[dict] = []
    position = 0
    while len(examples) < count and any(position < len(paths) for paths in per_class.values()):
        for true, paths in per_class.items():
            if position < len(paths) and len(examples) < count:
                examples.append({"path": paths[position], "true": true})
        position += 1
    return examples
